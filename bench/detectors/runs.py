"""Run RAP, STRIP and ONION on one (model, attack) the same way, timed, and score them one way.

Each function takes the bundle (its ONNX graph is the model every detector queries)
and the prepared inputs, and returns a `DetectorRun`: operating points at each dev FRR
target, the test FAR-vs-FRR curve, and the measured cost per input.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bench.detectors import onion, strip
from bench.detectors.classifier import Classifier
from bench.detectors.ngram import TrigramLM
from calibrate.rap.options import FRR_TARGETS
from guard.core.backends import load_backend
from guard.core.backends.base import precision_of
from guard.core.bundle import load_bundle
from guard.core.checker import Checker
from guard.core.detection import Detection, RowScores, first_windows, flagged_texts
from guard.core.thresholds import threshold_at_frr

# ------------------------------------------------------------------ operating points
# A detector sees inputs the model predicts as the target (protected) label and flags
# some. Rates, as in the RAP paper:
# - FRR: share of clean inputs predicted as the target that are flagged.
# - FAR: share of poisoned inputs predicted as the target that pass.
# - residual ASR: share of all non-target poisoned inputs that reach the target through
#   the detector (= ASR x FAR).
# Score detectors read one way: higher = more suspicious (RAP's score; STRIP's score is minus
# its entropy), flagged above a threshold fitted on clean held-out inputs at each FRR target
# (guard.core.thresholds). The guard's own detectors are flagged by guard.core.detection.


@dataclass(frozen=True)
class Operating:
    """One operating point: the threshold chosen for an FRR target and what it did."""

    frr_target: float
    threshold: float | None  # None: no bundle (refused_run)
    dev_frr: float
    test_frr: float
    test_far: float
    residual_asr: float

    def as_row(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DetectorRun:
    detector: str
    operating: list[Operating]
    curve: tuple[list[float], list[float]]  # test (FRR, FAR) as the threshold sweeps
    passes_per_input: float
    ms_per_input: float
    params: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {**self.__dict__, "operating": [o.as_row() for o in self.operating]}

    @classmethod
    def from_json(cls, payload: Mapping) -> DetectorRun:
        return cls(**{**payload, "operating": [Operating(**o) for o in payload["operating"]]})


def score_operating(
    dev: np.ndarray,
    clean: np.ndarray,
    poisoned: np.ndarray,
    asr: float,
    thresholds: Mapping[float, float] | None = None,
    frr_targets: Sequence[float] = FRR_TARGETS,
) -> list[Operating]:
    """Operating points of a score detector (flagged above); `thresholds` overrides fitting them on `dev`."""
    points = []
    for frr in frr_targets:
        t = thresholds[frr] if thresholds is not None else threshold_at_frr(dev, frr)
        far = 1.0 - flagged_share(poisoned, t)
        dev_frr, test_frr = flagged_share(dev, t), flagged_share(clean, t)
        points.append(Operating(frr, t, dev_frr, test_frr, far, asr * far if len(poisoned) else 0.0))
    return points


def score_curve(clean: np.ndarray, poisoned: np.ndarray) -> tuple[list[float], list[float]]:
    """Test (FRR, FAR) for every threshold between observed scores, kept as the corners of that
    staircase (rounded to 1e-6): a point between two others of the same FRR or the same FAR is
    left out, which changes no line drawn through the points."""
    grid = np.unique(np.concatenate([clean, poisoned, [-np.inf]]))[::-1]  # from flagging nothing to everything
    frr = np.array([flagged_share(clean, t) for t in grid])
    far = np.array([1.0 - flagged_share(poisoned, t) for t in grid])
    return curve_corners(frr, far)


def flagged_share(scores: np.ndarray, threshold: float) -> float:
    """The share of these scores above the threshold (0 for none): an FRR on clean rows, 1 - FAR on poisoned."""
    return float(np.mean(np.asarray(scores) > threshold)) if len(scores) else 0.0


def curve_corners(frr: np.ndarray, far: np.ndarray) -> tuple[list[float], list[float]]:
    """The points of a monotone (FRR, FAR) curve that are not inside a run of equal FRR or equal FAR."""
    frr, far = np.asarray(frr, dtype=float), np.asarray(far, dtype=float)
    inside = np.zeros(len(frr), dtype=bool)
    if len(frr) > 2:
        inside[1:-1] = ((frr[:-2] == frr[1:-1]) & (frr[1:-1] == frr[2:])) | (
            (far[:-2] == far[1:-1]) & (far[1:-1] == far[2:])
        )
    return frr[~inside].round(6).tolist(), far[~inside].round(6).tolist()


# ------------------------------------------------------------------ the detectors


@dataclass(frozen=True)
class Inputs:
    """Texts the detectors see: only those the model predicts as the target label."""

    dev: list[str]  # clean held-out rows (threshold fitting)
    clean: list[str]  # clean test rows
    poisoned: list[str]  # triggered test rows whose original label is not the target
    asr: float  # share of all non-target triggered rows predicted as the target
    pool: list[str]  # STRIP's replacement words: held-out rows of the non-target labels

    @property
    def test_count(self) -> int:
        return len(self.clean) + len(self.poisoned)


def run_rap(bundle_dir: Path, inputs: Inputs, target: int) -> DetectorRun:
    """RAP with the bundle's own thresholds (fitted at calibration on held-out dev rows)."""
    run = run_guard(bundle_dir, inputs, target, ("rap",))
    return DetectorRun("rap", run.operating, run.curve, run.passes_per_input, run.ms_per_input)


def run_guard(
    bundle_dir: Path, inputs: Inputs, target: int, detectors: tuple[str, ...], backend: str = "onnx"
) -> DetectorRun:
    """The guard's detectors ("rap", "features", "reader" or several) with the bundle's own thresholds for `backend`'s
    graph (`onnx-int8`: the int8 graph's thresholds, fitted on its own scores), flagged by the guard's rule."""
    bundle = load_bundle(bundle_dir)
    clean, poisoned, ms = _guard_scores(bundle, inputs, target, backend)
    chosen = Detection.of(bundle, detectors, precision_of(backend))
    points = []
    for frr in FRR_TARGETS:
        limits = {target: chosen.thresholds(frr)[target]}
        clean_flags, poisoned_flags = flagged_texts(clean, limits), flagged_texts(poisoned, limits)
        far = float(1.0 - poisoned_flags.mean()) if len(poisoned_flags) else 0.0
        test_frr = float(clean_flags.mean()) if len(clean_flags) else 0.0
        t = limits[target].rap if limits[target].rap is not None else limits[target].features
        # each threshold is a percentile of the held-out scores, so its dev FRR is the target itself
        points.append(Operating(frr, t, frr, test_frr, far, inputs.asr * far))
    curve = ([], [])
    if len(detectors) == 1:  # one score: the whole FAR-FRR curve
        curve = score_curve(_one_score(clean, detectors[0]), _one_score(poisoned, detectors[0]))
    passes = 1.0 + ("rap" in detectors) + ("reader" in detectors) + ("switch" in detectors)  # protect-label rows
    return DetectorRun("+".join(detectors), points, curve, passes, ms)


def _one_score(scores: RowScores, detector: str) -> np.ndarray:
    """One detector's score per text (its first window's; a blocklisted token scores +inf)."""
    first = first_windows(scores.owner)
    if detector == "rap":
        return scores.rap[first]
    return np.where(scores.token, np.inf, scores.features)[first]


_SCORED: dict[tuple, tuple] = {}  # one scoring per bundle and inputs, shared by its detectors


def _guard_scores(bundle, inputs: Inputs, target: int, backend: str) -> tuple[RowScores, RowScores, float]:
    """Every detector's scores of the clean and poisoned inputs (computed once per bundle, graph and inputs)."""
    key = (str(bundle.path), backend, target, len(inputs.clean), len(inputs.poisoned), hash(tuple(inputs.clean[:50])))
    if key not in _SCORED:
        checker = Checker.for_bundle(bundle, load_backend(backend, bundle.path))
        started = time.perf_counter()
        clean, poisoned = checker.scores(inputs.clean), checker.scores(inputs.poisoned)
        _SCORED[key] = (clean, poisoned, 1000 * (time.perf_counter() - started) / inputs.test_count)
    return _SCORED[key]


def refused_run(detector: str, inputs: Inputs, reason: str) -> DetectorRun:
    """A detector whose calibration refused this model: the user gets no bundle, so nothing is
    flagged (FRR 0, FAR 1, residual ASR = ASR); `params["refused"]` says why."""
    points = [Operating(frr, None, 0.0, 0.0, 1.0, inputs.asr) for frr in FRR_TARGETS]  # no threshold
    return DetectorRun(detector, points, ([], []), 1.0, 0.0, {"refused": reason})


def run_strip(bundle_dir: Path, inputs: Inputs, options: strip.StripOptions) -> DetectorRun:
    classifier = Classifier(bundle_dir)

    def suspicion(texts: Sequence[str], what: str) -> np.ndarray:
        """Minus STRIP's entropy: higher (a prediction the copies cannot move) is more suspicious."""
        probs_of = functools.partial(classifier.probs, progress=f"STRIP k={options.replace_ratio:g} {what}")
        return -strip.strip_entropies(probs_of, texts, inputs.pool, options)

    dev = suspicion(inputs.dev, "dev")
    started = time.perf_counter()
    clean, poisoned = suspicion(inputs.clean, "clean"), suspicion(inputs.poisoned, "poisoned")
    ms = 1000 * (time.perf_counter() - started) / inputs.test_count
    params = {
        "copies": options.copies,
        "replace_ratio": options.replace_ratio,
        "test_inputs": {"clean": len(inputs.clean), "poisoned": len(inputs.poisoned)},
    }
    # N copies + the unperturbed pass that predicted the target in the first place
    passes = options.copies + 1.0
    return DetectorRun(
        "strip",
        score_operating(dev, clean, poisoned, inputs.asr),
        score_curve(clean, poisoned),
        passes,
        ms + ms / options.copies,
        params,
    )


def run_onion(bundle_dir: Path, inputs: Inputs, lm: TrigramLM, target: int) -> DetectorRun:
    """ONION with its threshold picked among clean dev percentiles for each FRR target."""
    predict = _CachedPredict(Classifier(bundle_dir), target)
    dev = [onion.suspicion(lm, t) for t in tqdm(inputs.dev, desc="ONION dev suspicion", leave=False)]
    candidates = onion.candidate_thresholds(dev)
    dev_frr = {float(t): predict.flagged(dev, t) for t in tqdm(candidates, desc="ONION dev thresholds", leave=False)}
    started = time.perf_counter()
    clean = [onion.suspicion(lm, t) for t in inputs.clean]
    poisoned = [onion.suspicion(lm, t) for t in inputs.poisoned]
    lm_ms = 1000 * (time.perf_counter() - started) / inputs.test_count
    points = []
    for frr in FRR_TARGETS:
        t = onion.pick_threshold(dev_frr, frr)
        far = 1.0 - predict.flagged(poisoned, t)
        points.append(Operating(frr, t, dev_frr[t], predict.flagged(clean, t), far, inputs.asr * far))
    curve = [(predict.flagged(clean, t), 1.0 - predict.flagged(poisoned, t)) for t in candidates[::3]]
    lm_passes = float(np.mean([len(s.words) for s in clean + poisoned])) + 1
    params = {"language_model": "word trigram, Kneser-Ney (bench/detectors/ngram.py)", "lm_passes": lm_passes}
    # the pass that predicted the target, one on the cleaned text, and words + 1 LM passes
    ms = lm_ms + 2 * predict.ms_per_pass()
    return DetectorRun("onion", points, ([c[0] for c in curve], [c[1] for c in curve]), 2 + lm_passes, ms, params)


class _CachedPredict:
    """Predictions of cleaned texts; thresholds close together clean most inputs the same way."""

    def __init__(self, classifier: Classifier, target: int) -> None:
        self.classifier = classifier
        self.target = target
        self.cache: dict[str, int] = {}

    def flagged(self, suspicions: Sequence[onion.Suspicion], threshold: float) -> float:
        """Share of inputs (all predicted as the target) whose cleaned text is no longer the target."""
        if not suspicions:
            return 0.0
        texts = [s.cleaned(threshold) for s in suspicions]
        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            self.cache.update(zip(missing, self.classifier.predict(missing).tolist(), strict=True))
        return float(np.mean([self.cache[t] != self.target for t in texts]))

    def ms_per_pass(self, sample: Sequence[str] | None = None) -> float:
        """Milliseconds per model pass, batched as the other detectors are (64 cached texts)."""
        texts = list(sample or self.cache)[:64]
        started = time.perf_counter()
        self.classifier.probs(texts)
        return 1000 * (time.perf_counter() - started) / max(len(texts), 1)
