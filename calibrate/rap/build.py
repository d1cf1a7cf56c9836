"""`calibrate rap`: suspect model + clean held-out rows -> verified guard bundle.

model -> rap (train row, fit thresholds) -> export (ONNX + parity) -> report
-> guard.core.bundle.save_bundle. The bundle is assembled in a staging folder
and moved into place only when complete, so a failure never leaves half a bundle.
It holds what serving needs; the HF weights (hf/, as large as the graph again) only
with `keep_hf`, for the torch backend (`guard check --backend torch`, parity checks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from calibrate.data import label_counts, load_examples
from calibrate.inversion.subject import Subject, Vocabulary
from calibrate.model import (
    copy_tokenizer_files,
    flush_denormal,
    input_embeddings,
    label_names,
    load_classifier,
    tokenizer_json,
)
from calibrate.rap import token_scan
from calibrate.rap.export import INT8_RECIPE, check_parity, export_onnx, quantize_int8
from calibrate.rap.features import FeatureFit, fit_feature_detector
from calibrate.rap.optimize import add_optimized_graphs, eager_attention, report_entry
from calibrate.rap.options import MIN_CALIBRATION_ROWS, CalibrateOptions, RapJob
from calibrate.rap.perturbation import RapResult, learn_rap
from calibrate.record import check_replaceable, read_record
from calibrate.report import plot_deltas, write_json
from guard import __version__
from guard.core import features, rap, thresholds
from guard.core.backends.base import INT8_GRAPH
from guard.core.backends.onnx import OnnxBackend
from guard.core.bundle import (
    FeatureDetector,
    Int8Variant,
    JointThreshold,
    Manifest,
    ModelInfo,
    OptimizedGraphs,
    ProtectedLabel,
    RapToken,
    save_bundle,
    sha256_file,
)
from guard.core.checker import Checker
from guard.core.errors import InputError
from guard.core.features import FEATURES_FILE
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PARITY_ROWS = 64


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)


def calibrate_bundle(model_dir: Path, clean: list[Example], out_dir: Path, options: CalibrateOptions) -> Manifest:
    """Run calibration and write the bundle to `out_dir`; return its manifest."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_out_dir(out_dir, options.force)
    if out_dir.exists():
        check_replaceable(out_dir, (model_dir,))
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with flush_denormal():
            manifest = _build(model_dir, clean, staging, options)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"{out_dir} already exists and is not empty; pass --force to replace it")


def _build(model_dir: Path, clean: list[Example], staging: Path, options: CalibrateOptions) -> Manifest:
    timings = Timings()
    with timings.step("load"):
        model = load_classifier(model_dir)
        tokenizer_file = tokenizer_json(model_dir, staging / "converted")
        tokenizer = RapTokenizer.from_file(tokenizer_file, None, options.max_length)
    _check_probe_labels(options.probes, model.config.num_labels)
    with timings.step("rap"):
        result = learn_rap(model, tokenizer, clean, options.rap)
    detector = None
    if options.features:
        with timings.step("features"):
            reference = None if options.reference_model is None else input_embeddings(options.reference_model)
            subject = Subject(model, tokenizer, Vocabulary.from_file(tokenizer_file), model_dir)
            detector = fit_feature_detector(subject, result, options.shrinkage, options.rap.progress, reference)
            detector.stats.save(staging / FEATURES_FILE)
    with timings.step("export"):
        if options.keep_hf:
            (staging / "hf").mkdir()
            model.save_pretrained(str(staging / "hf"))
            copy_tokenizer_files(model_dir, staging / "hf")
        shutil.copy2(tokenizer_file, staging / "tokenizer.json")
        shutil.rmtree(staging / "converted", ignore_errors=True)
        with eager_attention(model):  # the pattern ONNX Runtime's fusions recognise (calibrate.rap.optimize)
            export_onnx(model, tokenizer, staging / "model.onnx")
        parity_texts = [e.text for e in result.calibration_texts[:PARITY_ROWS]]
        parity = check_parity(model, tokenizer, staging / "model.onnx", parity_texts)
    labels = label_names(model)
    int8 = optimized = None
    if options.int8:
        with timings.step("int8"):
            int8 = _int8_variant(staging, tokenizer, result, labels, options, detector)
    if options.optimize:
        with timings.step("optimize"):

            def refit(graph: Path, reference: Path) -> tuple[list[ProtectedLabel], float]:
                return _refit(graph, reference, tokenizer, result, labels, options, detector)

            fit = refit if options.int8 else None
            optimized = add_optimized_graphs(staging, staging / "model.onnx", model, tokenizer, parity_texts, fit)
    _write_rows(staging / "canaries.jsonl", result.calibration_texts[: options.canaries])
    if options.probes:
        _write_rows(staging / "probes.jsonl", options.probes)
    manifest = _manifest(model_dir, labels, result, options, detector).model_copy(
        update={"int8": int8, "optimized": optimized}
    )
    _write_report(staging, result, labels, parity, timings, options, int8, read_record(model_dir), detector, optimized)
    return save_bundle(staging, manifest)


def _protected_label(
    label: int, name: str, deltas: np.ndarray, frr_targets: tuple[float, ...], scores: np.ndarray | None = None
) -> ProtectedLabel:
    """Thresholds of RAP alone, and with `scores` (the same rows' feature scores) of the feature
    detector alone and of both together."""
    fields = {}
    if scores is not None:
        fields = {
            "features_thresholds": {f"{frr:g}": features.threshold_at_frr(scores, frr) for frr in frr_targets},
            "features_percentiles": features.percentile_table(scores),
            "joint": {f"{frr:g}": _joint(deltas, scores, frr) for frr in frr_targets},
        }
    return ProtectedLabel(
        label=label,
        name=name,
        thresholds={f"{frr:g}": rap.threshold_at_frr(deltas, frr) for frr in frr_targets},
        percentiles=rap.percentile_table(deltas),
        calibration_rows=len(deltas),
        **fields,
    )


def _joint(deltas: np.ndarray, scores: np.ndarray, frr: float) -> JointThreshold:
    pair = thresholds.joint(deltas, scores, frr)
    return JointThreshold(rap=pair.rap, features=pair.features)


def _int8_variant(
    staging: Path,
    tokenizer: RapTokenizer,
    result: RapResult,
    labels: list[str],
    options: CalibrateOptions,
    detector: FeatureFit | None,
) -> Int8Variant:
    """Quantize, then refit thresholds on the int8 graph's own held-out deltas (and feature scores)."""
    quantize_int8(staging / "model.onnx", staging / INT8_GRAPH)
    protected, agreement = _refit(
        staging / INT8_GRAPH, staging / "model.onnx", tokenizer, result, labels, options, detector
    )
    return Int8Variant(graph=INT8_GRAPH, quantization=INT8_RECIPE, protect=protected, agreement=agreement)


def _refit(
    graph: Path,
    reference: Path,
    tokenizer: RapTokenizer,
    result: RapResult,
    labels: list[str],
    options: CalibrateOptions,
    detector: FeatureFit | None,
) -> tuple[list[ProtectedLabel], float]:
    """Thresholds fitted on `graph`'s own held-out deltas (and feature scores), and its agreement with `reference`."""
    texts = [e.text for e in result.calibration_texts]
    protect = list(result.fits)
    statistic = options.rap.statistic
    stats = detector.stats if detector else None
    fp32 = Checker(tokenizer, OnnxBackend(reference), statistic=statistic).score(texts, protect)
    int8 = Checker(tokenizer, OnnxBackend(graph), statistic=statistic, features=stats)
    scored = int8.score(texts, protect)
    predicted, deltas = scored.probs.argmax(axis=1), scored.deltas()
    protected = []
    for label in protect:
        rows = (predicted == label) & ~np.isnan(deltas)
        if not rows.any():
            raise InputError(f"{graph.name} never predicts protect label {label} on the held-out rows")
        label_scores = scored.feature_scores[rows] if stats is not None else None
        protected.append(_protected_label(label, labels[label], deltas[rows], options.rap.frr_targets, label_scores))
    return protected, float(np.mean(predicted == fp32.probs.argmax(axis=1)))


def _manifest(
    model_dir: Path, labels: list[str], result: RapResult, options: CalibrateOptions, detector: FeatureFit | None
) -> Manifest:
    protect = [
        _protected_label(
            label,
            labels[label],
            fit.calibration_deltas,
            options.rap.frr_targets,
            detector.scores[label] if detector else None,
        )
        for label, fit in result.fits.items()
    ]
    feature_info = None
    if detector is not None:
        feature_info = FeatureDetector(
            layers=detector.stats.layers,
            hidden=detector.stats.hidden,
            shrinkage=options.shrinkage,
            fit_rows=detector.fit_rows,
        )
    return Manifest(
        guard_version=__version__,
        model=ModelInfo(
            source=str(model_dir.resolve()),
            source_sha256=_weights_sha(model_dir),
            labels=labels,
            max_length=options.max_length,
            classifier_max_length=options.classifier_max_length,
        ),
        rap=RapToken(
            token_id=result.token_id,
            init_word=result.init_word,
            init_norm=result.init_norm,
            final_norm=result.final_norm,
        ),
        protect=protect,
        default_frr=options.default_frr,
        calibrated_on="torch-fp32 (onnx-fp32 parity checked)",
        statistic=options.rap.statistic,
        features=feature_info,
    )


def _weights_sha(model_dir: Path) -> str:
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return sha256_file(model_dir / name)
    return ""


def _check_probe_labels(probes: tuple[Example, ...], num_labels: int) -> None:
    bad = sorted({p.label for p in probes if p.label >= num_labels})
    if bad:
        raise InputError(f"probes have labels {bad} but the model has {num_labels} labels (0..{num_labels - 1})")


def _write_rows(path: Path, rows: Sequence[Example]) -> None:
    """JSONL `{"text", "label"}` lines: the format guard.monitoring reads canaries and probes in."""
    path.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows))


def _write_report(
    staging: Path,
    result: RapResult,
    labels: list[str],
    parity: float,
    timings: Timings,
    options: CalibrateOptions,
    int8: Int8Variant | None = None,
    repair: dict | None = None,
    detector: FeatureFit | None = None,
    optimized: OptimizedGraphs | None = None,
) -> None:
    chosen = next(i for i, a in enumerate(result.attempts) if a.chosen)
    warnings = [
        f"label {labels[label]}: threshold at {frr:.1%} FRR is {t:.4f} <= 0 (that target flags almost nothing)"
        for label, fit in result.fits.items()
        for frr, t in fit.thresholds.items()
        if t <= 0 and options.rap.statistic in rap.DROP_STATISTICS
    ]
    write_json(
        staging / "report.json",
        {
            "rap_token": {
                "id": result.token_id,
                "init_word": result.init_word,
                "init_norm": result.init_norm,
                "final_norm": result.final_norm,
            },
            "options": {k: v for k, v in options.rap.__dict__.items() if k != "ladder"},
            "attempts": [a.__dict__ for a in result.attempts],
            "chosen_attempt": chosen,
            "adapted": chosen > 0,
            "note": "every attempt of the ladder is trained; the one with the largest held-out threshold at "
            "the selection FRR (select_frr) is kept, and calibration refuses if that threshold is <= 0",
            "labels": {
                labels[label]: {
                    "train_rows": fit.train_rows,
                    "calibration_rows": len(fit.calibration_deltas),
                    "thresholds": {f"{frr:g}": t for frr, t in fit.thresholds.items()},
                    "calibration_delta_median": float(np.median(fit.calibration_deltas)),
                }
                for label, fit in result.fits.items()
            },
            "frr_bounds": {
                labels[label]: frr_bounds(len(fit.calibration_deltas), options.rap.frr_targets)
                for label, fit in result.fits.items()
            },
            "features": None
            if detector is None
            else {
                "method": "per-layer Mahalanobis distance of [CLS] to the predicted label's clean mean (DAN), "
                "standardised per layer, largest over layers; flagged above the threshold",
                "fit_rows": detector.fit_rows,
                "shrinkage": options.shrinkage,
                "suspicious_tokens": detector.suspicious,
                "suspicious_note": f"input tokens whose embedding norm is over {features.SUSPICIOUS_Z:g} robust "
                "standard deviations above the vocabulary's median (embedding poisoning trains such a row); "
                "an input with one scores +inf",
                "reference_model": None if options.reference_model is None else str(options.reference_model),
                "moved_tokens": detector.moved,
                "moved_note": f"input tokens whose embedding row moved from the reference model's over "
                f"{features.MOVED_FACTOR:g} times as far as the {features.MOVED_QUANTILE:.1%} quantile of all rows' "
                "moves (null: no reference given); an input with one scores +inf",
                "flipped_tokens": detector.flipped,
                "held_out_rows_with_suspicious_tokens": {
                    labels[label]: int(np.count_nonzero(np.isposinf(s))) for label, s in detector.scores.items()
                },
                "flip_scan": [f.as_json() for f in detector.flip_scan],
                "flip_note": f"candidate tokens (source: with a reference the {token_scan.CANDIDATES} most-moved rows, "
                f"else a DBS trigger search's top {token_scan.CANDIDATES} towards each protect label), each "
                f"inserted at a random position into {token_scan.HOST_ROWS} clean rows predicted as another label: "
                f"flagged when it turns at least {token_scan.FLIP_RATE:.0%} of them into a protect label and occurs as "
                "a word in no clean row calibration trained on (a rare-word trigger); an input with one scores +inf",
                "thresholds": {
                    labels[label]: {f"{frr:g}": features.threshold_at_frr(s, frr) for frr in options.rap.frr_targets}
                    for label, s in detector.scores.items()
                },
                "joint": {
                    labels[label]: {
                        f"{frr:g}": thresholds.joint(fit.calibration_deltas, detector.scores[label], frr).__dict__
                        for frr in options.rap.frr_targets
                    }
                    for label, fit in result.fits.items()
                },
            },
            "onnx_parity_max_prob_diff": parity,
            "optimized": report_entry(optimized),
            "int8": None
            if int8 is None
            else {
                "graph": int8.graph,
                "quantization": int8.quantization,
                "agreement_with_fp32": int8.agreement,
                "thresholds": {p.name: p.thresholds for p in int8.protect},
            },
            "repair": repair,  # the repair record (repair.json) of the model, if a repair produced it
            "probes": len(options.probes),  # known-trigger rows in probes.jsonl (the live FAR canary)
            "seconds": timings.seconds,
            "warnings": warnings,
        },
    )
    plot_deltas(
        staging / "deltas.png",
        {labels[label]: fit.calibration_deltas for label, fit in result.fits.items()},
        {labels[label]: fit.thresholds for label, fit in result.fits.items()},
        title="held-out clean deltas",
    )


def frr_bounds(rows: int, frr_targets: tuple[float, ...]) -> dict[str, dict[str, float]]:
    """Per FRR target: the FRR the conformal threshold on `rows` held-out rows guarantees in
    expectation, and what it stays under with 90% confidence."""
    return {
        f"{frr:g}": {
            "expected": thresholds.expected_frr(frr, rows),
            "upper_90": thresholds.frr_upper_bound(frr, rows, 0.9),
        }
        for frr in frr_targets
    }


# ------------------------------------------------------------------ `calibrate rap`


def run_rap(job: RapJob, say: Callable[[str], None] = print) -> Manifest:
    """`calibrate rap`: load the rows, settle the protect labels, build the bundle, print its thresholds."""
    rap_options = job.options.rap
    low, up = rap_options.band
    if low >= up:
        flags = "--c-low/--c-up" if rap_options.objective == "paper" else "--logodds-band"
        raise InputError(f"{flags}: the lower bound ({low:g}) must be below the upper one ({up:g})")
    clean = load_examples(job.clean)
    probes = tuple(load_examples(job.probes)) if job.probes else ()
    protect = rap_options.protect_labels or choose_protect(label_counts(clean))
    options = replace(job.options, rap=replace(rap_options, protect_labels=tuple(protect)), probes=probes)
    manifest = calibrate_bundle(job.model, clean, job.out, options)
    for p in manifest.protect:
        table = ", ".join(f"{float(k):.1%}: {v:+.4f}" for k, v in p.thresholds.items())
        say(f"label {p.label} ({p.name}) thresholds by FRR target: {table}")
        frr = manifest.default_frr
        bound = thresholds.frr_upper_bound(frr, p.calibration_rows, 0.9)
        say(
            f"  at the {frr:.1%} target its {p.calibration_rows} held-out rows bound the clean FRR at "
            f"{thresholds.expected_frr(frr, p.calibration_rows):.2%} on average, {bound:.2%} with 90% confidence"
            + (
                ""
                if bound <= 1.5 * frr
                else f" (about {thresholds.rows_needed(frr)} such rows make it <= {1.5 * frr:.2%})"
            )
        )
    if manifest.features is not None:
        say(f"detectors: rap and features (the feature detector fitted on {manifest.features.fit_rows} rows)")
        report = json.loads((Path(job.out) / "report.json").read_text())["features"]
        suspicious, moved = report["suspicious_tokens"], report.get("moved_tokens")
        if suspicious:
            say(
                f"WARNING: {len(suspicious)} token(s) have an outlier embedding norm, the mark of embedding "
                f"poisoning: {', '.join(map(repr, suspicious[:10]))}; inputs with them are flagged"
            )
        if moved:
            say(
                f"WARNING: {len(moved)} token(s) moved far from {report['reference_model']} (fine-tuning moves "
                f"no row that far; embedding poisoning does): {', '.join(map(repr, moved[:10]))}; inputs with "
                "them are flagged"
            )
        elif moved is None:
            say(
                "  (no --reference-model: rows that moved from the public checkpoint were not checked; "
                "the flip scan tried a trigger search's candidates instead of the most-moved rows)"
            )
        for name, count in report["held_out_rows_with_suspicious_tokens"].items():
            if count:
                say(
                    f"WARNING: {count} held-out clean row(s) predicted {name} hold a flagged token: the guard "
                    "refuses such inputs at any threshold, and that share of clean traffic is FRR"
                )
        flipped = report.get("flipped_tokens")
        if flipped:
            say(
                f"WARNING: {len(flipped)} token(s) turn clean rows of other labels into a protect label wherever "
                f"they are inserted, and no clean row has them (a rare-word trigger): "
                f"{', '.join(map(repr, flipped[:10]))}; inputs with them are flagged"
            )
    out = Path(job.out)
    say(f"bundle written to {out} (report: {out / 'report.json'}, picture: {out / 'deltas.png'})")
    return manifest


def choose_protect(counts: dict[int, int], ask: Callable[[str], str] | None = None) -> tuple[int, ...]:
    """Ask on a terminal which labels to protect; otherwise every label with enough rows."""
    enough = tuple(label for label, n in counts.items() if n >= 2 * MIN_CALIBRATION_ROWS)
    ask = ask or (input if sys.stdin.isatty() else None)
    if ask is not None:
        listing = ", ".join(f"{label} ({n} rows)" for label, n in counts.items())
        default = " ".join(map(str, enough))
        answer = ask(f"labels in the clean data: {listing}\nwhich label ids should the guard protect? [{default}] ")
        if answer.strip():
            try:
                return tuple(int(x) for x in answer.replace(",", " ").split())
            except ValueError:
                raise InputError(f"expected label ids separated by spaces, got {answer!r}") from None
    if not enough:
        raise InputError(
            f"no label has {2 * MIN_CALIBRATION_ROWS} clean rows to calibrate on ({counts}); pass --protect LABEL"
        )
    print(f"protecting labels {list(enough)} (pass --protect to choose)", file=sys.stderr)
    return enough
