"""Thresholds from clean held-out scores, with a finite-sample FRR guarantee.

A threshold read off n held-out rows at a target FRR alpha is itself random: the
same 1% target gave test FRRs of 0.9-2.4% on ~230 rows. Split-conformal calibration
takes the k-th smallest clean delta with k = floor(alpha (n + 1)): a new clean row
from the same distribution falls below it with probability k / (n + 1) <= alpha.
That is a guarantee on average over held-out sets; the FRR of THIS threshold is
Beta(k, n + 1 - k) distributed, so `frr_upper_bound` states what it stays under
with a given confidence, and `rows_needed` how many rows make that bound tight.

RAP flags deltas BELOW its threshold, the feature detector scores ABOVE its own.
`joint` sets both at once so that together they flag the target share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.9


def rank_at(frr: float, n: int) -> int:
    """k = floor(frr (n + 1)): how many clean rows may lie at or below a flag-below threshold."""
    return int(math.floor(frr * (n + 1) + 1e-9))


def lower_threshold(clean: np.ndarray, frr: float) -> float:
    """Flag-below threshold: the k-th smallest clean value (k >= 1; then FRR <= frr in expectation).

    With too few rows (k = 0) no threshold meets the target; the smallest value is
    returned (expected FRR 1 / (n + 1)) and `frr_upper_bound` says so."""
    values = np.sort(np.asarray(clean, dtype=np.float64))
    if len(values) == 0:
        raise ValueError("no clean deltas to fit a threshold on")
    k = min(max(rank_at(frr, len(values)), 1), len(values))
    return float(values[k - 1])


def upper_threshold(clean: np.ndarray, frr: float) -> float:
    """Flag-above threshold: the k-th largest clean value, and always a finite one.

    A +inf value (the feature score of a row holding a suspicious token) is flagged at any
    threshold. When more of them than k sit among the clean rows, the threshold is the largest
    finite value: they alone are flagged, and their share, over the target, is the FRR."""
    values = np.asarray(clean, dtype=np.float64)
    threshold = -lower_threshold(-values, frr)
    if np.isfinite(threshold):
        return threshold
    finite = values[np.isfinite(values)]
    return float(finite.max()) if len(finite) else 0.0


def expected_frr(frr: float, n: int) -> float:
    """The FRR the conformal threshold guarantees in expectation: k / (n + 1)."""
    return max(rank_at(frr, n), 1) / (n + 1)


def frr_upper_bound(frr: float, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """u with P(FRR <= u) >= confidence for the conformal threshold of `frr` on n rows.

    The threshold's FRR is Beta(k, n + 1 - k); P(Beta <= u) = P(Binomial(n, u) >= k).
    """
    k = max(rank_at(frr, n), 1)
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if _binomial_at_least(n, mid, k) >= confidence:
            high = mid
        else:
            low = mid
    return high


def rows_needed(frr: float, slack: float = 1.5, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """Fewest held-out rows from which on (up to 4x as many) the bound at `confidence` stays
    within `slack` x frr. The bound is a saw-tooth in n: it jumps up each time k grows by one."""
    n = max(int(1 / frr), 1)
    while n < 10_000_000:
        jumps = [math.ceil(m / frr) - 1 for m in range(rank_at(frr, n) + 1, rank_at(frr, 4 * n) + 2)]
        if all(frr_upper_bound(frr, j, confidence) <= slack * frr for j in [n, *jumps]):
            return n
        n = int(n * 1.1) + 1
    return n


def _binomial_at_least(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k), summed in log space."""
    if p <= 0.0:
        return 0.0 if k > 0 else 1.0
    if p >= 1.0:
        return 1.0
    below = 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    for i in range(k):
        below += math.exp(
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        )
    return max(0.0, 1.0 - below)


@dataclass(frozen=True)
class JointThresholds:
    rap: float  # flag when delta < rap
    features: float  # flag when score > features
    rap_frr: float  # the FRR each was set at on its own
    features_frr: float


def joint(deltas: np.ndarray, scores: np.ndarray, frr: float) -> JointThresholds:
    """Both thresholds chosen so the two TOGETHER meet the conformal target k = floor(frr (n + 1))
    (k >= 1) on these n held-out rows. `deltas` and `scores` are the same rows' RAP delta and
    feature score.

    A detector alone at rank r flags a new clean row with probability r / (n + 1): the r - 1
    rows beyond its threshold plus the one AT it. Two detectors have a boundary row each, so
    the union counts every row at or beyond either threshold and must stay <= k (counting
    one boundary row, as a first version did, gave test FRR 1.84% at the 1% target).

    First both at one per-detector rank, the largest that fits; then the budget that rank
    leaves goes to RAP, then to the features, one rank at a time while the union still fits.
    Neither ends below rank 1. Rows scored +inf (a suspicious token) count against the target
    at any threshold; the feature threshold is always a finite score."""
    deltas, scores = np.asarray(deltas, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if len(deltas) != len(scores) or len(deltas) == 0:
        raise ValueError(f"need one delta and one score per held-out row, got {len(deltas)} and {len(scores)}")
    n = len(deltas)
    allowed = max(rank_at(frr, n), 1)
    # +inf scores (a suspicious token) are flagged at any threshold: the feature threshold is a finite score
    low, high = np.sort(deltas), np.sort(scores[np.isfinite(scores)])[::-1]
    if len(high) == 0:
        high = np.zeros(1)
    forced = int(np.count_nonzero(~np.isfinite(scores)))

    def fits(rap_rank: int, features_rank: int) -> bool:
        at_or_beyond = (deltas <= low[rap_rank - 1]) | (scores >= high[features_rank - 1])
        return int(np.count_nonzero(at_or_beyond)) <= allowed

    top = min(allowed, n)
    shared = _largest_rank(1, min(top, len(high)), lambda rank: fits(rank, rank))
    rap_rank = _largest_rank(shared, top, lambda rank: fits(rank, shared))
    features_rank = _largest_rank(shared, min(top, len(high)), lambda rank: fits(rap_rank, rank))
    return JointThresholds(
        float(low[rap_rank - 1]),
        float(high[features_rank - 1]),
        rap_rank / (n + 1),
        (features_rank + forced) / (n + 1),
    )


def _largest_rank(rank: int, top: int, fits: Callable[[int], bool]) -> int:
    """Raise `rank` one at a time, up to `top`, while the next rank still fits."""
    while rank < top and fits(rank + 1):
        rank += 1
    return rank
