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
from calibrate.report import markdown_table, plot_far_frr, plot_scores, write_json
from guard.core import detection, rap
from guard.core.backends import load_backend
from guard.core.backends.base import precision_of
from guard.core.bundle import Bundle, load_bundle
from guard.core.checker import Checker
from guard.core.detection import Detection, RowScores
from guard.core.errors import InputError
from guard.core.types import Example

COLUMNS = ["attack", "detector", "frr_target", "cacc", "asr", "test_frr", "test_far", "residual_asr", "poisoned_rows"]


@dataclass(frozen=True)
class _Scored:
    """One data set's texts, scored by the checker `guard check` uses (`scores`: per window)."""

    labels: np.ndarray
    scores: RowScores

    @property
    def predicted(self) -> np.ndarray:
        """Each text's label: its first window's prediction (what the server answers)."""
        return self.scores.predicted[detection.first_windows(self.scores.owner)]

    @property
    def checked(self) -> np.ndarray:
        """Texts with a window predicted as a protected label (the ones the guard checks)."""
        rows = ~np.isnan(self.scores.rap) | ~np.isnan(self.scores.features)
        return detection.per_text(rows, self.scores.owner, len(self.labels))

    def rap_scores(self, target: int) -> np.ndarray:
        """The RAP scores of the windows predicted as `target`."""
        s = self.scores
        return s.rap[(s.predicted == target) & ~np.isnan(s.rap)]


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
    """Score the clean and poisoned rows once (the server's steps), then flag them at every FRR target."""
    bundle = load_bundle(bundle_dir)
    target = _target(bundle, target)
    backend_ = load_backend(backend, bundle.path)
    chosen = Detection.of(bundle, precision=precision_of(backend_.name))
    checker = Checker.for_bundle(bundle, backend_, chosen)
    clean_s = _score(checker, clean, bundle, "clean")
    attacks = {
        name: _score(checker, [r for r in rows if r.label != target], bundle, name) for name, rows in poisoned.items()
    }
    for name, scored in attacks.items():
        if len(scored.labels) == 0:
            raise InputError(f"poisoned set {name!r} has no rows whose original label differs from the target {target}")
    cacc = float(np.mean(clean_s.predicted == clean_s.labels))
    rows = []
    for frr in chosen.targets:
        for detectors in detector_sets(chosen.detectors):
            limits = Detection.of(bundle, detectors, precision_of(backend_.name)).thresholds(frr)
            for name, scored in attacks.items():
                rows.append(_row(name, "+".join(detectors), frr, cacc, clean_s, scored, limits, target))
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
    labels = np.array([r.label for r in rows], dtype=int)
    num_labels = len(bundle.manifest.model.labels)
    bad = sorted({r.label for r in rows if r.label >= num_labels})
    if bad:
        raise InputError(f"data has labels {bad} but the model has {num_labels} labels")
    parts = []
    with progress_bar(total=len(rows), desc=f"evaluate {what}", unit="row") as bar:
        for i in range(0, len(rows), SCORE_CHUNK):
            chunk = rows[i : i + SCORE_CHUNK]
            parts.append(checker.scores([r.text for r in chunk]))
            bar.update(len(chunk))
    return _Scored(labels, RowScores.concat(parts) if parts else checker.scores([]))


def _row(
    name: str,
    detector: str,
    frr: float,
    cacc: float,
    clean: _Scored,
    attack: _Scored,
    limits: dict,
    target: int,
) -> dict:
    checked = clean.checked
    hit = attack.predicted == target
    passed = hit & ~detection.flagged_texts(attack.scores, limits)
    clean_flags = detection.flagged_texts(clean.scores, limits)
    return {
        "attack": name,
        "detector": detector,
        "frr_target": frr,
        "cacc": cacc,
        "asr": float(hit.mean()),
        "test_frr": float(clean_flags[checked].mean()) if checked.any() else 0.0,
        "test_far": float(passed[hit].mean()) if hit.any() else 0.0,
        "residual_asr": float(passed.mean()),
        "poisoned_rows": int(len(attack.labels)),
    }


def far_frr_curve(clean: _Scored, attack: _Scored, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(FRR, FAR) as one RAP threshold on the target label sweeps over all observed scores."""
    clean_s, attack_s = clean.rap_scores(target), attack.rap_scores(target)
    grid = np.unique(np.concatenate([clean_s, attack_s, [-np.inf]]))
    frr = np.array([(clean_s > t).mean() if len(clean_s) else 0.0 for t in grid])
    far = np.array([(attack_s <= t).mean() if len(attack_s) else 0.0 for t in grid])
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
    (label,) = [p for p in evaluation.bundle.protected(precision_of(evaluation.backend)) if p.label == target]
    plot_scores(
        out_dir / "deltas.png",
        {name: clean.rap_scores(target)},
        {name: {float(k): v for k, v in label.thresholds.items()}},
        xlabel=rap.FORMULAS[evaluation.bundle.manifest.statistic],
        poisoned={a: s.rap_scores(target) for a, s in attacks.items()},
        title="test RAP scores",
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
