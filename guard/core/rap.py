"""The RAP statistic: how the perturbation moves the predicted label, as a score.

RAP (Yang et al., EMNLP 2021) inserts a learned perturbation token and watches
what it does to the probability of the predicted protect label y. Clean inputs are
pushed away from y; backdoor-triggered inputs barely move, because the trigger
dominates the prediction. Like every detector's score (guard.core.detection), the
RAP score is higher for a more suspicious input and flagged above its threshold.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

import numpy as np

# What the RAP score measures on the predicted label y (logit(p) = log p - log(1 - p)):
#   floored (default): logit p(y|x+RAP) - max(logit p(y|x), floor_y), floor_y the label's FLOOR_QUANTILE of its
#              clean training rows' log-odds. For an input at least as confident as the floor it is minus the
#              log-odds drop: RAP's own idea (a triggered input barely moves), measured where a drop means
#              something. For a less confident one it is how far the perturbed input stays below the floor, so
#              the unsure clean inputs the perturbation may push UP are not flagged (the drops' failure, below).
#              An attacker who keeps the triggered input's confidence and [CLS] features clean-like (bench's
#              adaptive-cls and adaptive-both) passes `perturbed` but not this (bench/results/adaptive.md).
#   perturbed: logit p(y|x+RAP), how confident the perturbed input stays in y. Triggered inputs stay
#              confident under the perturbation; clean ones are pushed down. Unlike both drops it does not flag
#              the clean inputs the model was unsure of (p ~ 0.6, which the perturbation may push UP): on SST-2
#              BadNet-SL those were the 1-2% of clean rows every drop statistic flagged.
#   prob:      p(y|x+RAP) - p(y|x), minus the paper's probability drop. On a confident model p(y|x) ~ 0.996
#              for clean and triggered inputs alike, so both drops are near 0 and hard to tell apart.
#   logodds:   logit p(y|x+RAP) - logit p(y|x), minus the drop of the log-odds: the same drop where a confident
#              model still has room (0.999 -> 0.99 is 2.3 nats).
Statistic = Literal["floored", "perturbed", "prob", "logodds"]
STATISTICS: tuple[str, ...] = ("floored", "perturbed", "prob", "logodds")
DEFAULT_STATISTIC: Statistic = "floored"
FORMULAS: dict[str, str] = {  # each statistic's score, as a plot's axis reads it
    "floored": "logit p(label | x + RAP) - max(logit p(label | x), floor)",
    "perturbed": "logit p(label | x + RAP)",
    "prob": "p(label | x + RAP) - p(label | x)",
    "logodds": "logit p(label | x + RAP) - logit p(label | x)",
}
DROP_STATISTICS: tuple[str, ...] = ("prob", "logodds")  # a drop: a clean row's score is below 0
FLOORED: tuple[str, ...] = ("floored",)  # statistics that need each protected label's floor
FLOOR_QUANTILE = 0.10  # of the label's clean training rows' log-odds
LOGODDS_CLIP = 1e-12  # logit(p) is bounded to about +-27.6


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def eligible_rows(probs: np.ndarray, protect_labels: Collection[int]) -> np.ndarray:
    """Indices of rows whose argmax is a protected label: only these are checked."""
    if len(probs) == 0:
        return np.empty(0, dtype=np.intp)
    predicted = probs.argmax(axis=-1)
    return np.flatnonzero(np.isin(predicted, list(protect_labels)))


def log_odds(p: np.ndarray) -> np.ndarray:
    """logit(p) = log p - log(1 - p), with p clipped to [LOGODDS_CLIP, 1 - LOGODDS_CLIP]."""
    q = np.clip(np.asarray(p, dtype=np.float64), LOGODDS_CLIP, 1.0 - LOGODDS_CLIP)
    return np.log(q) - np.log1p(-q)


def label_fall(before: np.ndarray, after: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, logit before[y] - logit after[y] of its label y (`labels`): how far y's log-odds fall from one
    set of probabilities to another (the reader's and the switch detector's scores)."""
    rows = np.arange(len(labels))
    return log_odds(before[rows, labels]) - log_odds(after[rows, labels])


def floor(clean_probs: np.ndarray) -> float:
    """A protected label's floor: the FLOOR_QUANTILE of its clean rows' log-odds (their p(label | x))."""
    values = log_odds(np.asarray(clean_probs, dtype=np.float64))
    if len(values) == 0:
        raise ValueError("a floor needs at least one clean row of the label")
    return round(float(np.quantile(values, FLOOR_QUANTILE)), 6)


def scores(
    probs: np.ndarray,
    perturbed: np.ndarray,
    statistic: Statistic = DEFAULT_STATISTIC,
    floors: Mapping[int, float] | None = None,
) -> np.ndarray:
    """The RAP score of each row on its predicted label y (pass-1 `probs`, pass-2 `perturbed`); "floored" needs
    `floors`, protected label -> its floor."""
    predicted = probs.argmax(axis=-1)
    rows = np.arange(len(probs))
    before, after = probs[rows, predicted], perturbed[rows, predicted]
    if statistic == "floored":
        return log_odds(after) - np.maximum(log_odds(before), _per_row(predicted, floors))
    if statistic == "perturbed":
        return log_odds(after)
    if statistic == "logodds":
        return log_odds(after) - log_odds(before)
    if statistic == "prob":
        return np.asarray(after, dtype=np.float64) - before
    raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")


def per_label(predicted: np.ndarray, by_label: Mapping[int, float | None]) -> np.ndarray:
    """by_label[predicted[i]] for each row, NaN where its label has no value (one table lookup)."""
    table = np.full(max([*by_label, int(predicted.max(initial=0))]) + 1, np.nan)
    for label, value in by_label.items():
        if value is not None:
            table[label] = value
    return table[predicted]


def _per_row(predicted: np.ndarray, floors: Mapping[int, float] | None) -> np.ndarray:
    values = per_label(predicted, floors or {})
    if np.isnan(values).any():
        missing = sorted(set(predicted[np.isnan(values)].tolist()))
        raise ValueError(f"the floored statistic needs a floor for label(s) {missing}; recalibrate the bundle")
    return values
