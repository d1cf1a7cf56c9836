"""The RAP decision rule: the one home of eligibility, delta and threshold test.

RAP (Yang et al., EMNLP 2021) inserts a learned perturbation token and watches
how much the probability of the predicted protect label drops. Clean inputs
drop by at least the calibrated threshold; backdoor-triggered inputs barely
move, because the trigger dominates the prediction. Calibration and serving
both call these functions, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import numpy as np

from guard.core.types import RapCheck, Verdict

# Percentiles stored in the bundle: every 0.1 up to 10 (where FRR targets
# live), then every 1 up to 100, so a new FRR target needs no recalibration.
PERCENTILE_GRID: tuple[float, ...] = tuple(
    [round(0.1 * i, 1) for i in range(0, 100)] + [float(i) for i in range(10, 101)]
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def eligible_rows(probs: np.ndarray, protect_labels: Collection[int]) -> np.ndarray:
    """Indices of rows whose argmax is a protected label: only these get pass 2."""
    if len(probs) == 0:
        return np.empty(0, dtype=np.intp)
    predicted = probs.argmax(axis=-1)
    return np.flatnonzero(np.isin(predicted, list(protect_labels)))


# The detection statistic: how far the perturbation moves the predicted label y.
#   prob:    p(y|x) - p(y|x+RAP), the paper's. On a confident model p(y|x) ~ 0.999 for clean and
#            triggered inputs alike, so both drops are near 0 and hard to tell apart.
#   logodds: logit(p(y|x)) - logit(p(y|x+RAP)), logit(p) = log p - log(1 - p). The same order of
#            inputs, measured where a confident model still has room: 0.999 -> 0.99 is 2.3 nats.
Statistic = Literal["prob", "logodds"]
STATISTICS: tuple[str, ...] = ("prob", "logodds")
LOGODDS_CLIP = 1e-12  # logit(p) is bounded to about +-27.6


def statistic_of(p: np.ndarray, statistic: Statistic = "prob") -> np.ndarray:
    """The statistic's value for probabilities `p` of the predicted label."""
    if statistic == "prob":
        return np.asarray(p, dtype=np.float64)
    if statistic == "logodds":
        q = np.clip(np.asarray(p, dtype=np.float64), LOGODDS_CLIP, 1.0 - LOGODDS_CLIP)
        return np.log(q) - np.log1p(-q)
    raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")


def protect_deltas(probs: np.ndarray, perturbed: np.ndarray, statistic: Statistic = "prob") -> np.ndarray:
    """delta = s(p(y|x)) - s(p(y|x+RAP)) on each row's predicted label y, s the statistic."""
    predicted = probs.argmax(axis=-1)
    rows = np.arange(len(probs))
    return statistic_of(probs[rows, predicted], statistic) - statistic_of(perturbed[rows, predicted], statistic)


def flagged_mask(deltas: np.ndarray, threshold: float) -> np.ndarray:
    """Poisoned inputs are the ones the perturbation fails to move enough."""
    return np.asarray(deltas) < threshold


def flagged_share(scores: np.ndarray, threshold: float) -> float:
    """The share of these scores the threshold flags (0 for none): an FRR on clean rows, 1 - FAR on poisoned."""
    return float(np.mean(flagged_mask(scores, threshold))) if len(scores) else 0.0


def is_flagged(delta: float, threshold: float) -> bool:
    return bool(flagged_mask(np.asarray([delta]), threshold)[0])


def threshold_at_frr(deltas: np.ndarray, frr: float) -> float:
    """Threshold that flags a fraction `frr` of these clean deltas."""
    if len(deltas) == 0:
        raise ValueError("no clean deltas to fit a threshold on")
    return float(np.percentile(np.asarray(deltas, dtype=np.float64), frr * 100.0))


def percentile_table(deltas: np.ndarray) -> dict[str, float]:
    """Clean-delta percentiles on PERCENTILE_GRID, keyed by the percentile as text."""
    values = np.percentile(np.asarray(deltas, dtype=np.float64), PERCENTILE_GRID)
    return {f"{q:g}": float(v) for q, v in zip(PERCENTILE_GRID, values, strict=True)}


def threshold_from_table(table: Mapping[str, float], frr: float) -> float:
    """Interpolate a threshold for any FRR target from a stored percentile table."""
    qs = np.array([float(k) for k in table], dtype=np.float64)
    vs = np.array(list(table.values()), dtype=np.float64)
    order = np.argsort(qs)
    return float(np.interp(frr * 100.0, qs[order], vs[order]))


def decide(
    probs: np.ndarray,
    perturbed: np.ndarray,
    thresholds: Mapping[int, float],
    statistic: Statistic = "prob",
) -> list[Verdict]:
    """Turn pass-1 probabilities and pass-2 probabilities into verdicts.

    `perturbed` holds pass-2 probabilities for exactly the rows returned by
    `eligible_rows(probs, thresholds)`, in that order (lazy scheduling runs
    pass 2 on those rows only; fused scheduling selects them).
    """
    checked = eligible_rows(probs, thresholds.keys())
    if len(perturbed) != len(checked):
        raise ValueError(f"expected pass-2 probabilities for {len(checked)} rows, got {len(perturbed)}")
    deltas = protect_deltas(probs[checked], perturbed, statistic) if len(checked) else np.empty(0)
    rap_by_row = {}
    for row, delta in zip(checked.tolist(), deltas.tolist(), strict=True):
        threshold = thresholds[int(probs[row].argmax())]
        rap_by_row[row] = (RapCheck(checked=True, delta=delta, threshold=threshold), is_flagged(delta, threshold))
    verdicts = []
    for row, p in enumerate(probs):
        rap, flagged = rap_by_row.get(row, (RapCheck(checked=False), False))
        verdicts.append(Verdict(label=int(p.argmax()), probs=tuple(float(x) for x in p), flagged=flagged, rap=rap))
    return verdicts


def merge_windows(row_verdicts: Sequence[Verdict], owner: Sequence[int]) -> list[Verdict]:
    """One verdict per text from the verdicts of its windows (rows, `owner[i]` = its text).

    A text is flagged when any of its windows is; its label and probabilities are its
    first window's. The RAP check reported is the flagged window's, else the first
    checked one's.
    """
    if len(row_verdicts) == len(set(owner)):  # one window per text: the common case
        return list(row_verdicts)
    by_text: dict[int, list[Verdict]] = {}
    for verdict, text in zip(row_verdicts, owner, strict=True):
        by_text.setdefault(text, []).append(verdict)
    merged = []
    for text in sorted(by_text):
        windows = by_text[text]
        flagged = [v for v in windows if v.flagged]
        checked = [v for v in windows if v.rap.checked]
        shown = (flagged or checked or windows)[0].rap
        merged.append(Verdict(windows[0].label, windows[0].probs, bool(flagged), shown))
    return merged
