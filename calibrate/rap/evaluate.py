"""`calibrate evaluate`: how well a bundle catches poisoned inputs.

Definitions (as in the RAP paper):
- CACC: accuracy on clean test rows.
- ASR: share of non-target poisoned rows the model predicts as the target.
- FRR: share of clean rows predicted as a protected label that the guard flags.
- FAR: share of poisoned rows predicted as the target that the guard lets pass.
- residual ASR: share of non-target poisoned rows that still reach the target
  through the guard (ASR x FAR).
Poisoned files carry each row's ORIGINAL label; rows already of the target label
are left out of ASR/FAR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrate.data import load_examples
from calibrate.progress import progress_bar
from calibrate.rap.options import EvaluateJob
from calibrate.report import markdown_table, plot_deltas, plot_far_frr, write_json
from guard.core import rap
from guard.core.backends import load_backend
from guard.core.backends.base import precision_of
from guard.core.bundle import Bundle, load_bundle
from guard.core.checker import Checker, Scores
from guard.core.errors import InputError
from guard.core.types import Example, LabelThresholds

COLUMNS = ["attack", "detector", "frr_target", "cacc", "asr", "test_frr", "test_far", "residual_asr", "poisoned_rows"]


@dataclass(frozen=True)
class _Scored:
    labels: np.ndarray
    predicted: np.ndarray
    deltas: np.ndarray  # NaN where pass 2 did not run
    feature_scores: np.ndarray  # NaN where the feature detector did not score

    def target_deltas(self, target: int) -> np.ndarray:
        return self.deltas[(self.predicted == target) & ~np.isnan(self.deltas)]


@dataclass(frozen=True)
class Evaluation:
    bundle: Bundle
    backend: str
    target: int
    clean: _Scored
    attacks: dict[str, _Scored]
    rows: list[dict]

    def summary(self) -> dict:
        return {
            "bundle": str(self.bundle.path),
            "backend": self.backend,
            "target": self.target,
            "clean_rows": len(self.clean.labels),
            "rows": self.rows,
        }


def evaluate_bundle(
    bundle_dir: Path,
    clean: list[Example],
    poisoned: dict[str, list[Example]],
    target: int | None = None,
    backend: str = "onnx",
) -> Evaluation:
    """Score the clean and poisoned rows once, then read every FRR target off the deltas."""
    bundle = load_bundle(bundle_dir)
    target = _target(bundle, target)
    stats = bundle.feature_stats() if "features" in bundle.detectors else None
    backend_ = load_backend(backend, bundle.path)
    checker = Checker(bundle.tokenizer(), backend_, statistic=bundle.manifest.statistic, features=stats)
    clean_s = _score(checker, clean, bundle, "clean")
    attacks = {
        name: _score(checker, [r for r in rows if r.label != target], bundle, name) for name, rows in poisoned.items()
    }
    for name, scored in attacks.items():
        if len(scored.labels) == 0:
            raise InputError(f"poisoned set {name!r} has no rows whose original label differs from the target {target}")
    cacc = float(np.mean(clean_s.predicted == clean_s.labels))
    rows = []
    for frr_key in bundle.manifest.protect[0].thresholds:
        for detectors in detector_sets(bundle.detectors):
            thresholds = bundle.label_thresholds(detectors, float(frr_key), precision_of(backend))
            for name, scored in attacks.items():
                rows.append(_row(name, "+".join(detectors), float(frr_key), cacc, clean_s, scored, thresholds, target))
    return Evaluation(bundle, backend, target, clean_s, attacks, rows)


def _target(bundle: Bundle, target: int | None) -> int:
    protect = bundle.protect_labels
    if target is None:
        if len(protect) > 1:
            raise InputError(f"the bundle protects labels {protect}; say which one the attack targets with --target")
        return protect[0]
    if target not in protect:
        raise InputError(f"target label {target} is not protected by this bundle (protected: {protect})")
    return target


def detector_sets(available: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Each detector alone, then all together: ("rap",), ("features",), ("rap", "features")."""
    return [(d,) for d in available] + ([available] if len(available) > 1 else [])


SCORE_CHUNK = 256  # rows per progress step


def _score(checker: Checker, rows: list[Example], bundle: Bundle, what: str) -> _Scored:
    if not rows:
        return _Scored(np.empty(0, int), np.empty(0, int), np.empty(0), np.empty(0))
    num_labels = len(bundle.manifest.model.labels)
    bad = sorted({r.label for r in rows if r.label >= num_labels})
    if bad:
        raise InputError(f"data has labels {bad} but the model has {num_labels} labels")
    predicted, deltas, feature_scores = [], [], []
    with progress_bar(total=len(rows), desc=f"evaluate {what}", unit="row") as bar:
        for i in range(0, len(rows), SCORE_CHUNK):
            chunk = rows[i : i + SCORE_CHUNK]
            scores: Scores = checker.score([r.text for r in chunk], bundle.protect_labels)
            predicted.append(scores.probs.argmax(axis=1))
            deltas.append(scores.deltas())
            feature_scores.append(scores.feature_scores)
            bar.update(len(chunk))
    labels = np.array([r.label for r in rows])
    return _Scored(labels, np.concatenate(predicted), np.concatenate(deltas), np.concatenate(feature_scores))


def _flagged(scored: _Scored, thresholds: dict[int, LabelThresholds]) -> np.ndarray:
    """Flag decision per row with its predicted label's thresholds (never for unchecked rows):
    RAP's delta below its threshold, or the feature score above its own."""
    flagged = np.zeros(len(scored.predicted), dtype=bool)
    for label, limits in thresholds.items():
        rows = scored.predicted == label
        if limits.rap is not None:
            checked = rows & ~np.isnan(scored.deltas)
            flagged |= checked & rap.flagged_mask(np.where(checked, scored.deltas, np.inf), limits.rap)
        if limits.features is not None:
            scored_rows = rows & ~np.isnan(scored.feature_scores)
            flagged |= scored_rows & (np.where(scored_rows, scored.feature_scores, -np.inf) > limits.features)
    return flagged


def _row(
    name: str,
    detector: str,
    frr: float,
    cacc: float,
    clean: _Scored,
    attack: _Scored,
    thresholds: dict[int, LabelThresholds],
    target: int,
) -> dict:
    protected = ~np.isnan(clean.deltas)
    hit = attack.predicted == target
    passed = hit & ~_flagged(attack, thresholds)
    return {
        "attack": name,
        "detector": detector,
        "frr_target": frr,
        "cacc": cacc,
        "asr": float(hit.mean()),
        "test_frr": float(_flagged(clean, thresholds)[protected].mean()) if protected.any() else 0.0,
        "test_far": float(passed[hit].mean()) if hit.any() else 0.0,
        "residual_asr": float(passed.mean()),
        "poisoned_rows": int(len(attack.labels)),
    }


def far_frr_curve(clean: _Scored, attack: _Scored, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(FRR, FAR) as one threshold on the target label sweeps over all observed deltas."""
    clean_d, attack_d = clean.target_deltas(target), attack.target_deltas(target)
    grid = np.unique(np.concatenate([clean_d, attack_d, [np.inf]]))
    frr = np.array([rap.flagged_mask(clean_d, t).mean() if len(clean_d) else 0.0 for t in grid])
    far = np.array([(~rap.flagged_mask(attack_d, t)).mean() if len(attack_d) else 0.0 for t in grid])
    return frr, far


def write_evaluation(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """evaluation.json, evaluation.md, far_frr.png and deltas.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    write_json(out_dir / "evaluation.json", summary)
    (out_dir / "evaluation.md").write_text(
        f"# RAP evaluation of `{summary['bundle']}` ({evaluation.backend}, target label {evaluation.target})\n\n"
        + markdown_table(evaluation.rows, COLUMNS)
    )
    target, clean, attacks = evaluation.target, evaluation.clean, evaluation.attacks
    curves = {name: far_frr_curve(clean, scored, target) for name, scored in attacks.items()}
    points = {
        name: [
            (r["frr_target"], r["test_frr"], r["test_far"])
            for r in evaluation.rows
            if r["attack"] == name and r["detector"] == "rap"
        ]
        for name in attacks
    }
    plot_far_frr(out_dir / "far_frr.png", curves, points)
    name = evaluation.bundle.manifest.model.labels[target]
    plot_deltas(
        out_dir / "deltas.png",
        {name: clean.target_deltas(target)},
        {
            name: {
                float(k): v
                for k, v in evaluation.bundle.thresholds_by_frr(target, precision_of(evaluation.backend)).items()
            }
        },
        poisoned={a: s.target_deltas(target) for a, s in attacks.items()},
        title="test deltas",
    )
    return [out_dir / n for n in ("evaluation.json", "evaluation.md", "far_frr.png", "deltas.png")]


def run_evaluate(job: EvaluateJob, say: Callable[[str], None] = print) -> Evaluation:
    """`calibrate evaluate`: score the bundle on the clean and poisoned files; write and print the table."""
    named = [named_set(spec) for spec in job.poisoned]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise InputError(f"two poisoned sets share a name ({', '.join(names)}); name them with NAME=FILE")
    poisoned = {name: load_examples(path) for name, path in named}
    evaluation = evaluate_bundle(job.bundle, load_examples(job.clean), poisoned, job.target, job.backend)
    files = write_evaluation(evaluation, job.out or Path(job.bundle) / "evaluation")
    say(markdown_table(evaluation.rows, COLUMNS))
    say("written: " + ", ".join(str(f) for f in files))
    return evaluation


def named_set(spec: str) -> tuple[str, Path]:
    """`NAME=FILE` -> (NAME, FILE); a bare FILE is named after its folder (or its stem)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, Path(path)
    return Path(spec).parent.name or Path(spec).stem, Path(spec)
