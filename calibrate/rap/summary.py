"""The calibration report (report.json): a typed record derived from the manifest and what
calibration measured, and the warnings `calibrate rap` prints, read from it in memory.

The thresholds in it are the manifest's own (guard.core.detection.fit_label computed them
once); what the report adds is how calibration got there: the RAP attempts, the rows, the
token blocklists and their sources, the FRR bounds, timings.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from calibrate.rap.features import FeatureFit
from calibrate.rap.perturbation import RapResult
from guard.core import rap, thresholds
from guard.core.bundle import JointThreshold, Manifest
from guard.core.family import RAP_PLACES

# below this agreement with the suspect on held-out rows (and no --reader-texts) the summary suggests them
READER_AGREEMENT_HINT = 0.95


class LabelReport(BaseModel):
    train_rows: int
    calibration_rows: int
    thresholds: dict[str, float] = Field(description="FRR target -> RAP score threshold (the manifest's)")
    calibration_score_median: float


class FeatureReport(BaseModel):
    fit_rows: int
    shrinkage: float
    suspicious_tokens: list[str] = Field(description="tokens with an outlier embedding norm")
    reference_model: str | None
    moved_tokens: list[str] | None = Field(description="tokens whose row moved far from the reference (None: none)")
    flipped_tokens: list[str] = Field(description="tokens the flip scan flagged")
    held_out_rows_with_suspicious_tokens: dict[str, int]
    flip_scan: list[dict]
    thresholds: dict[str, dict[str, float]] = Field(description="label -> FRR target -> feature score threshold")
    joint: dict[str, dict[str, JointThreshold]]


class Int8Report(BaseModel):
    graph: str
    quantization: str
    agreement_with_fp32: float
    thresholds: dict[str, dict[str, float]]


class CalibrationReport(BaseModel):
    rap_token: dict[str, int | float | str]
    options: dict
    attempts: list[dict]
    chosen_attempt: int
    adapted: bool
    labels: dict[str, LabelReport]
    frr_bounds: dict[str, dict[str, dict[str, float]]]
    features: FeatureReport | None
    onnx_parity_max_prob_diff: float
    optimized: dict | None
    int8: Int8Report | None
    repair: dict | None = Field(description="the model's repair record (repair.json), if a repair produced it")
    probes: int = Field(description="known-trigger rows in probes.jsonl (the live FAR canary)")
    seconds: dict[str, float]
    reader: str = Field(description="how the reader detector's base was chosen, or why there is none")
    warnings: list[str]


def build_report(
    manifest: Manifest,
    result: RapResult,
    detector: FeatureFit | None,
    measured: dict,
) -> CalibrationReport:
    """The report of a bundle: `manifest` as written, `measured`: rap_options (dict), parity, optimized (dict),
    repair, probes, reference_model, reader (how its base was chosen), seconds."""
    chosen = next(i for i, a in enumerate(result.attempts) if a.chosen)
    by_label = {p.label: p for p in manifest.protect}
    labels = {
        by_label[label].name: LabelReport(
            train_rows=fit.train_rows,
            calibration_rows=len(fit.calibration_scores),
            thresholds=by_label[label].thresholds,
            calibration_score_median=float(np.median(fit.calibration_scores)),
        )
        for label, fit in result.fits.items()
    }
    report = CalibrationReport(
        rap_token=manifest.rap.model_dump(),
        options=measured["rap_options"],
        attempts=[{**a.__dict__, "selection_threshold": a.selection_threshold} for a in result.attempts],
        chosen_attempt=chosen,
        adapted=chosen > 0,
        labels=labels,
        frr_bounds={p.name: frr_bounds(p.calibration_rows, list(map(float, p.thresholds))) for p in manifest.protect},
        features=None if detector is None else _features(manifest, detector, measured),
        onnx_parity_max_prob_diff=measured["parity"],
        optimized=measured["optimized"],
        int8=None if manifest.int8 is None else _int8(manifest),
        repair=measured["repair"],
        probes=measured["probes"],
        seconds=measured["seconds"],
        reader=measured["reader"],
        warnings=[],
    )
    return report.model_copy(update={"warnings": threshold_warnings(manifest)})


def _features(manifest: Manifest, detector: FeatureFit, measured: dict) -> FeatureReport:
    names = {p.label: p.name for p in manifest.protect}
    return FeatureReport(
        fit_rows=detector.fit_rows,
        shrinkage=manifest.features.shrinkage,
        suspicious_tokens=detector.suspicious,
        reference_model=measured["reference_model"],
        moved_tokens=detector.moved,
        flipped_tokens=detector.flipped,
        held_out_rows_with_suspicious_tokens={names[label]: int(b.sum()) for label, b in detector.blocked.items()},
        flip_scan=[f.as_json() for f in detector.flip_scan],
        thresholds={p.name: p.features_thresholds for p in manifest.protect},
        joint={p.name: p.joint for p in manifest.protect},
    )


def _int8(manifest: Manifest) -> Int8Report:
    int8 = manifest.int8
    return Int8Report(
        graph=int8.graph,
        quantization=int8.quantization,
        agreement_with_fp32=int8.agreement,
        thresholds={p.name: p.thresholds for p in int8.protect},
    )


def frr_bounds(rows: int, frr_targets: list[float]) -> dict[str, dict[str, float]]:
    """Per FRR target: the FRR the conformal threshold on `rows` held-out rows guarantees in
    expectation, and what it stays under with 90% confidence."""
    return {
        f"{frr:g}": {
            "expected": thresholds.expected_frr(frr, rows),
            "upper_90": thresholds.frr_upper_bound(frr, rows, 0.9),
        }
        for frr in frr_targets
    }


def threshold_warnings(manifest: Manifest) -> list[str]:
    """Under a drop statistic (and `floored`, a drop above the floor), a threshold >= 0 (no drop) flags almost
    nothing."""
    if manifest.statistic not in (*rap.DROP_STATISTICS, *rap.FLOORED):
        return []
    return [
        f"label {p.name}: threshold at {float(frr):.1%} FRR is {t:+.4f} >= 0: no drop (flags almost nothing)"
        for p in manifest.protect
        for frr, t in p.thresholds.items()
        if t >= 0
    ]


def summary_lines(manifest: Manifest, report: CalibrationReport) -> list[str]:
    """What `calibrate rap` prints: thresholds, their FRR bounds, and the feature detector's warnings."""
    lines = []
    for p in manifest.protect:
        table = ", ".join(f"{float(k):.1%}: {v:+.4f}" for k, v in p.thresholds.items())
        lines.append(f"label {p.label} ({p.name}) RAP score thresholds by FRR target: {table}")
        frr = manifest.default_frr
        bound = thresholds.frr_upper_bound(frr, p.calibration_rows, 0.9)
        more = (
            "" if bound <= 1.5 * frr else f" (about {thresholds.rows_needed(frr)} such rows make it <= {1.5 * frr:.2%})"
        )
        lines.append(
            f"  at the {frr:.1%} target its {p.calibration_rows} held-out rows bound the clean FRR at "
            f"{thresholds.expected_frr(frr, p.calibration_rows):.2%} on average, {bound:.2%} with 90% confidence{more}"
        )
    lines.append(
        f"RAP row: pass 2 puts it {RAP_PLACES[manifest.rap.position]} (--rap-position {manifest.rap.position})"
    )
    lines += [f"WARNING: {w}" for w in report.warnings]
    detectors = len(manifest.detectors)
    for p in manifest.protect:
        short = thresholds.detectors_affordable(manifest.default_frr, p.calibration_rows, detectors)
        if short is not None and detectors > 1:
            reach, rows = short
            lines.append(
                f"WARNING: label {p.name}: at the {manifest.default_frr:.1%} target its {p.calibration_rows} held-out "
                f"rows afford {max(thresholds.rank_at(manifest.default_frr, p.calibration_rows), 1)} flagged row(s); "
                f"each of the {detectors} detectors flags beyond its own highest clean score, so the clean FRR may "
                f"reach {reach:.1%} (about {rows} such rows afford them all; or a higher --default-frr, or fewer "
                "detectors: --reader none, no --switch)"
            )
    if manifest.features is not None and report.features is not None:
        lines.append(f"detectors: rap and features (the feature detector fitted on {manifest.features.fit_rows} rows)")
        lines += _feature_warnings(report.features)
    if manifest.reader is None:
        lines.append(f"detector: no reader ({report.reader})")
    else:
        r = manifest.reader
        texts = ""
        if r.texts:
            how = "trusted: unscreened" if r.texts_trusted else "the rest screened out"
            texts = f" and {r.texts_kept} of {r.texts} unlabeled texts ({how})"
        lines.append(
            f"detector: reader ({r.graph}), fine-tuned from {r.base} on {r.train_rows} clean rows{texts} "
            f"({report.reader}): "
            f"{r.accuracy:.1%} accurate on the held-out rows, agrees with the suspect on {r.agreement:.1%}"
        )
        if r.accuracy < 0.7:
            lines.append(
                "WARNING: the reader learnt little from these rows; its disagreement is mostly noise and spends FRR "
                "(more clean rows, unlabeled --reader-texts, more --reader-epochs, or --reader none)"
            )
        elif r.agreement < READER_AGREEMENT_HINT and not r.texts:
            lines.append(
                f"hint: the reader disagrees with the suspect on {1 - r.agreement:.1%} of the held-out rows, and its "
                "clean disagreements set its threshold; a few thousand unlabeled in-domain texts raise its agreement "
                "(--reader-texts; measured best with --reader-texts-trusted, for texts no attacker wrote to: "
                "bench/results/detection_matrix.md, reader@texts*)"
            )
    if manifest.switch is not None:
        lines.append(
            f"detector: switch (inserts {manifest.switch.word!r}, the RAP row's init word, untrained): flags a "
            "protect-label prediction that collapses under it"
        )
    return lines


def _feature_warnings(report: FeatureReport) -> list[str]:
    lines = []
    if report.suspicious_tokens:
        lines.append(
            f"WARNING: {len(report.suspicious_tokens)} token(s) have an outlier embedding norm, the mark of embedding "
            f"poisoning: {_listed(report.suspicious_tokens)}; inputs with them are flagged"
        )
    if report.moved_tokens:
        lines.append(
            f"WARNING: {len(report.moved_tokens)} token(s) moved far from {report.reference_model} (fine-tuning moves "
            f"no row that far; embedding poisoning does): {_listed(report.moved_tokens)}; inputs with them are flagged"
        )
    elif report.moved_tokens is None:
        lines.append(
            "  (no --reference-model: rows that moved from the public checkpoint were not checked; "
            "the flip scan tried a trigger search's candidates instead of the most-moved rows)"
        )
    for name, count in report.held_out_rows_with_suspicious_tokens.items():
        if count:
            lines.append(
                f"WARNING: {count} held-out clean row(s) predicted {name} hold a flagged token: the guard "
                "refuses such inputs at any threshold, and that share of clean traffic is FRR"
            )
    if report.flipped_tokens:
        lines.append(
            f"WARNING: {len(report.flipped_tokens)} token(s) turn clean rows of other labels into a protect label "
            f"wherever they are inserted, and no clean row has them (a rare-word trigger): "
            f"{_listed(report.flipped_tokens)}; inputs with them are flagged"
        )
    return lines


def _listed(tokens: list[str]) -> str:
    return ", ".join(map(repr, tokens[:10]))
