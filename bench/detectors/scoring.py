"""What every detector's numbers are made of, computed one way for all of them.

A detector sees inputs the model predicts as the target (protected) label and flags
some. Rates, as in the RAP paper:
- FRR: share of clean inputs predicted as the target that are flagged.
- FAR: share of poisoned inputs predicted as the target that pass.
- residual ASR: share of all non-target poisoned inputs that reach the target through
  the detector (= ASR x FAR).
Score detectors (RAP's delta, STRIP's entropy) flag an input when its score is below a
threshold fitted on clean held-out inputs at each FRR target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

FRR_TARGETS = (0.005, 0.01, 0.03, 0.05)


@dataclass(frozen=True)
class Operating:
    """One operating point: the threshold chosen for an FRR target and what it did."""

    frr_target: float
    threshold: float
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


def flagged_share(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores < threshold)) if len(scores) else 0.0


def threshold_for(dev_scores: np.ndarray, frr: float) -> float:
    """The threshold flagging a share `frr` of the clean held-out scores."""
    return float(np.percentile(dev_scores, frr * 100.0))


def score_operating(
    dev: np.ndarray,
    clean: np.ndarray,
    poisoned: np.ndarray,
    asr: float,
    thresholds: Mapping[float, float] | None = None,
    frr_targets: Sequence[float] = FRR_TARGETS,
) -> list[Operating]:
    """Operating points of a score detector; `thresholds` overrides fitting them on `dev`."""
    points = []
    for frr in frr_targets:
        t = thresholds[frr] if thresholds is not None else threshold_for(dev, frr)
        far = 1.0 - flagged_share(poisoned, t)
        points.append(
            Operating(frr, t, flagged_share(dev, t), flagged_share(clean, t), far, asr * far if len(poisoned) else 0.0)
        )
    return points


def score_curve(clean: np.ndarray, poisoned: np.ndarray) -> tuple[list[float], list[float]]:
    """Test (FRR, FAR) for every threshold between observed scores."""
    grid = np.unique(np.concatenate([clean, poisoned, [np.inf]]))
    frr = [flagged_share(clean, t) for t in grid]
    far = [1.0 - flagged_share(poisoned, t) for t in grid]
    return frr, far
