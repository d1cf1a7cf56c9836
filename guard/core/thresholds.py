"""Thresholds from clean held-out scores, with a finite-sample FRR guarantee.

A threshold read off n held-out rows at a target FRR alpha is itself random: the
same 1% target gave test FRRs of 0.9-2.4% on ~230 rows. Split-conformal calibration
takes the k-th largest clean score with k = floor(alpha (n + 1)): a new clean row
from the same distribution scores above it with probability k / (n + 1) <= alpha.
That is a guarantee on average over held-out sets; the FRR of THIS threshold is
Beta(k, n + 1 - k) distributed, so `frr_upper_bound` states what it stays under
with a given confidence, and `rows_needed` how many rows make that bound tight.

Every detector's score reads one way: higher = more suspicious, flagged ABOVE its
threshold (guard.core.detection). `joint` sets two detectors' thresholds at once so
that together they flag the target share. A bundle stores each threshold at every FRR
of PERCENTILE_GRID, so a new FRR target needs no recalibration (`threshold_from_table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.9
# FRRs (percent) a bundle stores a threshold for: every 0.1 up to 10 (where FRR targets live), then every 1.
PERCENTILE_GRID: tuple[float, ...] = tuple(
    [round(0.1 * i, 1) for i in range(0, 100)] + [float(i) for i in range(10, 101)]
)


def rank_at(frr: float, n: int) -> int:
    """k = floor(frr (n + 1)): how many clean rows may lie at or above a threshold."""
    return int(math.floor(frr * (n + 1) + 1e-9))


def threshold_at_frr(clean: np.ndarray, frr: float) -> float:
    """Flag-above threshold: the k-th largest clean score, and always a finite one (the one
    threshold rule of every detector: a new clean row scores above it with probability <= frr).

    A +inf value (a held-out row holding a blocklisted token, which is flagged at any
    threshold) counts against the target. When more of them than k sit among the clean rows,
    the threshold is the largest finite value: they alone are flagged, and their share, over
    the target, is the FRR."""
    values = np.sort(np.asarray(clean, dtype=np.float64))[::-1]
    if len(values) == 0:
        raise ValueError("no clean scores to fit a threshold on")
    # with too few rows (k = 0) no threshold meets the target: the largest score (expected FRR 1 / (n + 1))
    k = min(max(rank_at(frr, len(values)), 1), len(values))
    threshold = float(values[k - 1])
    if np.isfinite(threshold):
        return threshold
    finite = values[np.isfinite(values)]
    return float(finite.max()) if len(finite) else 0.0


def percentile_table(clean: np.ndarray) -> dict[str, float]:
    """`threshold_at_frr` of these clean scores at each FRR of PERCENTILE_GRID (percent), keyed by it as text."""
    values = np.asarray(clean, dtype=np.float64)
    return {f"{q:g}": threshold_at_frr(values, q / 100.0) for q in PERCENTILE_GRID}


def threshold_from_table(table: Mapping[str, float], frr: float) -> float:
    """Interpolate a threshold for any FRR target from a stored `percentile_table`."""
    qs = np.array([float(k) for k in table], dtype=np.float64)
    vs = np.array(list(table.values()), dtype=np.float64)
    order = np.argsort(qs)
    return float(np.interp(frr * 100.0, qs[order], vs[order]))


def expected_frr(frr: float, n: int) -> float:
    """The FRR the conformal threshold guarantees in expectation: k / (n + 1)."""
    return max(rank_at(frr, n), 1) / (n + 1)


def detectors_affordable(frr: float, n: int, detectors: int) -> tuple[float, int] | None:
    """None when n held-out rows afford `detectors` united thresholds at `frr` (k >= detectors); else
    the FRR they may reach, detectors / (n + 1) (each, at rank 1 at least, flags a new clean row
    beyond its own highest held-out score with probability 1 / (n + 1)), and the rows that afford them."""
    if rank_at(frr, n) >= detectors:
        return None
    return detectors / (n + 1), math.ceil(detectors / frr) - 1


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
    rap: float  # flag when the RAP score > rap
    features: float  # flag when the feature score > features
    rap_frr: float  # the FRR each was set at on its own
    features_frr: float


def joint(rap_scores: np.ndarray, feature_scores: np.ndarray, frr: float) -> JointThresholds:
    """The RAP and feature thresholds chosen together (`union` of the two, RAP first)."""
    (rap_t, features_t), (rap_frr, features_frr) = union([rap_scores, feature_scores], frr)
    return JointThresholds(rap_t, features_t, rap_frr, features_frr)


def union(scores: Sequence[np.ndarray], frr: float) -> tuple[list[float], list[float]]:
    """Thresholds of several detectors chosen so that TOGETHER they meet the conformal target
    k = floor(frr (n + 1)) (k >= 1) on these n held-out rows (the same rows' scores, each flagged
    above), and the FRR each was set at on its own.

    A detector alone at rank r flags a new clean row with probability r / (n + 1): the r - 1
    rows beyond its threshold plus the one AT it. Each detector has a boundary row, so the
    union counts every row at or beyond any threshold and must stay <= k (counting one
    boundary row, as a first version did, gave test FRR 1.84% at the 1% target).

    First all at one per-detector rank, the largest that fits; then the budget that rank
    leaves goes to each detector in order, one rank at a time while the union still fits.
    None ends below rank 1. Rows scored +inf (a blocklisted token) count against the target
    at any threshold; each threshold is a finite score."""
    arrays = [np.asarray(s, dtype=np.float64) for s in scores]
    n = len(arrays[0]) if arrays else 0
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError(f"need one score per held-out row from every detector, got {[len(a) for a in arrays]}")
    allowed = max(rank_at(frr, n), 1)
    highs = [_finite_descending(a) for a in arrays]

    def fits(ranks: Sequence[int]) -> bool:
        at_or_beyond = np.logical_or.reduce([a >= h[r - 1] for a, h, r in zip(arrays, highs, ranks, strict=True)])
        return int(np.count_nonzero(at_or_beyond)) <= allowed

    top = min(allowed, n)
    shared = _largest_rank(1, min(top, *(len(h) for h in highs)), lambda rank: fits([rank] * len(arrays)))
    ranks = [shared] * len(arrays)
    for i, high in enumerate(highs):
        others = ranks.copy()

        def fits_at(rank: int, i: int = i, others: list[int] = others) -> bool:
            others[i] = rank
            return fits(others)

        ranks[i] = _largest_rank(shared, min(top, len(high)), fits_at)
    chosen = [float(h[r - 1]) for h, r in zip(highs, ranks, strict=True)]
    own = [(r + int(np.count_nonzero(~np.isfinite(a)))) / (n + 1) for a, r in zip(arrays, ranks, strict=True)]
    return chosen, own


def _finite_descending(values: np.ndarray) -> np.ndarray:
    """The finite values, largest first (one 0 when there is none: a threshold stays finite)."""
    high = np.sort(values[np.isfinite(values)])[::-1]
    return high if len(high) else np.zeros(1)


def _largest_rank(rank: int, top: int, fits: Callable[[int], bool]) -> int:
    """Raise `rank` one at a time, up to `top`, while the next rank still fits."""
    while rank < top and fits(rank + 1):
        rank += 1
    return rank
