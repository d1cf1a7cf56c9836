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

from calibrate.data import label_counts, load_examples, load_texts
from calibrate.inversion.subject import Subject, Vocabulary
from calibrate.model import (
    copy_tokenizer_config,
    copy_tokenizer_files,
    flush_denormal,
    input_embeddings,
    label_names,
    load_classifier,
    model_tokenizer,
    tokenizer_json,
    weights_sha256,
)
from calibrate.rap.export import INT8_RECIPE, check_parity, export_onnx, quantize_int8
from calibrate.rap.features import FeatureFit, fit_feature_detector
from calibrate.rap.optimize import add_optimized_graphs, eager_attention, report_entry
from calibrate.rap.options import MIN_CALIBRATION_ROWS, CalibrateOptions, RapJob
from calibrate.rap.perturbation import RapResult, learn_rap
from calibrate.rap.reader import ReaderFit, choose_reader, fit_reader
from calibrate.rap.refit import HeldOut
from calibrate.rap.summary import CalibrationReport, build_report, summary_lines
from calibrate.rap.switch import SwitchFit, fit_switch
from calibrate.record import check_replaceable, read_record
from calibrate.report import plot_scores, write_json
from guard import __version__
from guard.core import detection, rap
from guard.core.backends.base import INT8_GRAPH
from guard.core.bundle import (
    READER_GRAPH,
    FeatureDetector,
    Int8Variant,
    Manifest,
    ModelInfo,
    RapToken,
    save_bundle,
)
from guard.core.errors import InputError
from guard.core.features import FEATURES_FILE
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger(__name__)

PARITY_ROWS = 64


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)


@dataclass(frozen=True)
class Calibrated:
    manifest: Manifest
    report: CalibrationReport


def calibrate_bundle(model_dir: Path, clean: list[Example], out_dir: Path, options: CalibrateOptions) -> Manifest:
    """Run calibration and write the bundle to `out_dir`; return its manifest."""
    return calibrate(model_dir, clean, out_dir, options).manifest


def calibrate(model_dir: Path, clean: list[Example], out_dir: Path, options: CalibrateOptions) -> Calibrated:
    """Run calibration and write the bundle to `out_dir`; return its manifest and report."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_out_dir(out_dir, options.force)
    if out_dir.exists():
        check_replaceable(out_dir, (model_dir,))
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with flush_denormal():
            calibrated = _build(model_dir, clean, staging, options)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return calibrated


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"{out_dir} already exists and is not empty; pass --force to replace it")


def _build(model_dir: Path, clean: list[Example], staging: Path, options: CalibrateOptions) -> Calibrated:
    timings = Timings()
    with timings.step("load"):
        model = load_classifier(model_dir)
        tokenizer_file = tokenizer_json(model_dir, staging / "converted")
        tokenizer = model_tokenizer(model, tokenizer_file, options.max_length)
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
        copy_tokenizer_config(tokenizer_file.parent, staging)  # the pad token's name (guard.core.tokenizer.Framing)
        shutil.rmtree(staging / "converted", ignore_errors=True)
        with eager_attention(model):  # the pattern ONNX Runtime's fusions recognise (calibrate.rap.optimize)
            export_onnx(model, tokenizer, staging / "model.onnx")
        parity_texts = [e.text for e in result.calibration_texts[:PARITY_ROWS]]
        parity = check_parity(model, tokenizer, staging / "model.onnx", parity_texts)
    reader = None
    with timings.step("reader"):
        choice = choose_reader(options, staging / "tokenizer.json", staging / "reader-converted")
        if choice.base is not None:
            classes, suspect_tokenizer = model.config.num_labels, staging / "tokenizer.json"
            reader = fit_reader(choice.base, clean, result, suspect_tokenizer, staging, options, classes, model)
    switch = None
    if options.switch:
        with timings.step("switch"):
            plain = RapTokenizer.from_file(staging / "tokenizer.json", None, options.max_length)
            switch = fit_switch(staging / "model.onnx", plain, result, model.config.num_labels)
    labels = label_names(model)
    held_out = HeldOut(
        tokenizer,
        [e.text for e in result.calibration_texts],
        list(result.fits),
        labels,
        options.rap.statistic,
        options.rap.frr_targets,
        detector.stats if detector else None,
        result.floors,
        staging / READER_GRAPH if reader else None,
        switch.info.token_id if switch else None,
    )
    int8 = optimized = None
    if options.int8:
        with timings.step("int8"):
            int8 = _int8_variant(staging, held_out)
    if options.optimize:
        with timings.step("optimize"):
            fit = held_out.fit if options.int8 else None
            optimized = add_optimized_graphs(staging, staging / "model.onnx", model, tokenizer, parity_texts, fit)
    _write_rows(staging / "canaries.jsonl", result.calibration_texts[: options.canaries])
    if options.probes:
        _write_rows(staging / "probes.jsonl", options.probes)
    manifest = _manifest(model_dir, labels, result, options, detector, reader, switch).model_copy(
        update={"int8": int8, "optimized": optimized}
    )
    measured = {
        "rap_options": {k: v for k, v in options.rap.__dict__.items() if k != "ladder"},
        "parity": parity,
        "optimized": report_entry(optimized),
        "repair": read_record(model_dir),
        "probes": len(options.probes),
        "reference_model": None if options.reference_model is None else str(options.reference_model),
        "reader": choice.why,
        "seconds": timings.seconds,
    }
    report = build_report(manifest, result, detector, measured)
    write_json(staging / "report.json", report.model_dump(mode="json"))
    plot_scores(
        staging / "deltas.png",
        {labels[label]: fit.calibration_scores for label, fit in result.fits.items()},
        {p.name: {float(k): v for k, v in p.thresholds.items()} for p in manifest.protect},
        xlabel=rap.FORMULAS[options.rap.statistic],
        title="held-out clean RAP scores",
    )
    return Calibrated(save_bundle(staging, manifest), report)


def _int8_variant(staging: Path, held_out: HeldOut) -> Int8Variant:
    """Quantize, then refit thresholds on the int8 graph's own held-out scores."""
    quantize_int8(staging / "model.onnx", staging / INT8_GRAPH)
    protected, agreement = held_out.fit(staging / INT8_GRAPH, staging / "model.onnx")
    return Int8Variant(graph=INT8_GRAPH, quantization=INT8_RECIPE, protect=protected, agreement=agreement)


def _manifest(
    model_dir: Path,
    labels: list[str],
    result: RapResult,
    options: CalibrateOptions,
    detector: FeatureFit | None,
    reader: ReaderFit | None = None,
    switch: SwitchFit | None = None,
) -> Manifest:
    protect = [
        detection.fit_label(
            label,
            labels[label],
            options.rap.frr_targets,
            fit.calibration_scores,
            detector.scores[label] if detector else None,
            detector.blocked[label] if detector else None,
            result.floors.get(label),
            reader.scores[label] if reader else None,
            switch.scores[label] if switch else None,
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
            source_sha256=weights_sha256(model_dir),
            labels=labels,
            max_length=options.max_length,
            classifier_max_length=options.classifier_max_length,
        ),
        rap=RapToken(
            token_id=result.token_id,
            init_word=result.init_word,
            init_norm=result.init_norm,
            final_norm=result.final_norm,
            position=options.rap.rap_position,
        ),
        protect=protect,
        default_frr=options.default_frr,
        calibrated_on="torch-fp32 (onnx-fp32 parity checked)",
        statistic=options.rap.statistic,
        features=feature_info,
        reader=reader.info if reader else None,
        switch=switch.info if switch else None,
    )


def _check_probe_labels(probes: tuple[Example, ...], num_labels: int) -> None:
    bad = sorted({p.label for p in probes if p.label >= num_labels})
    if bad:
        raise InputError(f"probes have labels {bad} but the model has {num_labels} labels (0..{num_labels - 1})")


def _write_rows(path: Path, rows: Sequence[Example]) -> None:
    """JSONL `{"text", "label"}` lines: the format guard.monitoring reads canaries and probes in."""
    path.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows))


# ------------------------------------------------------------------ `calibrate rap`


def run_rap(job: RapJob, say: Callable[[str], None] = print) -> Manifest:
    """`calibrate rap`: load the rows, settle the protect labels, build the bundle, print its thresholds."""
    clean = load_examples(job.clean)
    probes = tuple(load_examples(job.probes)) if job.probes else ()
    texts = tuple(load_texts(job.reader_texts)) if job.reader_texts else ()
    protect = job.options.rap.protect_labels or choose_protect(label_counts(clean))
    rap = replace(job.options.rap, protect_labels=tuple(protect))
    trusted = job.reader_texts_trusted
    options = replace(job.options, rap=rap, probes=probes, reader_texts=texts, reader_texts_trusted=trusted)
    calibrated = calibrate(job.model, clean, job.out, options)
    for line in summary_lines(calibrated.manifest, calibrated.report):
        say(line)
    out = Path(job.out)
    say(f"bundle written to {out} (report: {out / 'report.json'}, picture: {out / 'deltas.png'})")
    return calibrated.manifest


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
