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

from guard.core import thresholds
from guard.core.types import LabelThresholds, RapCheck, Verdict

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


# The detection statistic: how the perturbation moves the predicted label y.
#   prob:      p(y|x) - p(y|x+RAP), the paper's drop. On a confident model p(y|x) ~ 0.996 for clean
#              and triggered inputs alike, so both drops are near 0 and hard to tell apart.
#   logodds:   logit(p(y|x)) - logit(p(y|x+RAP)), logit(p) = log p - log(1 - p): the same drop where
#              a confident model still has room (0.999 -> 0.99 is 2.3 nats).
#   perturbed: -logit(p(y|x+RAP)), how far the perturbed input lands from y. Triggered inputs stay
#              confident under the perturbation; clean ones are pushed down. Unlike both drops it does
#              not flag the clean inputs the model was unsure of (p ~ 0.6, which the perturbation may
#              push UP): on SST-2 BadNet-SL those were the 1-2% of clean rows below every drop threshold.
# Every statistic flags a row when its delta is BELOW the label's threshold.
Statistic = Literal["prob", "logodds", "perturbed"]
STATISTICS: tuple[str, ...] = ("perturbed", "prob", "logodds")
DROP_STATISTICS: tuple[str, ...] = ("prob", "logodds")
LOGODDS_CLIP = 1e-12  # logit(p) is bounded to about +-27.6


def statistic_of(p: np.ndarray, statistic: Statistic = "prob") -> np.ndarray:
    """The value whose drop a drop statistic measures, for probabilities `p` of the predicted label."""
    if statistic == "prob":
        return np.asarray(p, dtype=np.float64)
    if statistic in ("logodds", "perturbed"):
        q = np.clip(np.asarray(p, dtype=np.float64), LOGODDS_CLIP, 1.0 - LOGODDS_CLIP)
        return np.log(q) - np.log1p(-q)
    raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")


def protect_deltas(probs: np.ndarray, perturbed: np.ndarray, statistic: Statistic = "prob") -> np.ndarray:
    """delta on each row's predicted label y: s(p(y|x)) - s(p(y|x+RAP)) for a drop statistic,
    -logit(p(y|x+RAP)) for "perturbed"."""
    predicted = probs.argmax(axis=-1)
    rows = np.arange(len(probs))
    if statistic == "perturbed":
        return -statistic_of(perturbed[rows, predicted], statistic)
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
    """Threshold that flags at most a fraction `frr` of clean rows like these (guard.core.thresholds:
    the conformal order statistic, so the FRR on new clean rows is <= frr in expectation)."""
    return thresholds.lower_threshold(deltas, frr)


def percentile_table(deltas: np.ndarray) -> dict[str, float]:
    """The clean deltas' threshold at each FRR of PERCENTILE_GRID (in percent), keyed by it as text."""
    values = np.asarray(deltas, dtype=np.float64)
    return {f"{q:g}": threshold_at_frr(values, q / 100.0) for q in PERCENTILE_GRID}


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
    """RAP alone: `decide_all` with each label's RAP threshold."""
    return decide_all(probs, perturbed, {k: LabelThresholds(v) for k, v in thresholds.items()}, statistic)


def decide_all(
    probs: np.ndarray,
    perturbed: np.ndarray,
    thresholds: Mapping[int, LabelThresholds],
    statistic: Statistic = "prob",
    feature_scores: np.ndarray | None = None,
) -> list[Verdict]:
    """Turn pass-1 probabilities, pass-2 probabilities and feature scores into verdicts.

    `perturbed` and `feature_scores` hold values for exactly the rows returned by
    `eligible_rows(probs, thresholds)`, in that order (lazy scheduling runs pass 2 on
    those rows only; fused scheduling selects them). `perturbed` may be empty when no
    label has a RAP threshold (the feature detector alone), `feature_scores` None when
    none has a feature threshold. A row is flagged when ANY detector with a threshold
    for its label flags it.
    """
    checked = eligible_rows(probs, thresholds.keys())
    uses_rap = any(t.rap is not None for t in thresholds.values())
    uses_features = any(t.features is not None for t in thresholds.values())
    if uses_rap and len(perturbed) != len(checked):
        raise ValueError(f"expected pass-2 probabilities for {len(checked)} rows, got {len(perturbed)}")
    if not uses_features:
        feature_scores = None
    elif feature_scores is None or len(feature_scores) != len(checked):
        got = None if feature_scores is None else len(feature_scores)
        raise ValueError(f"expected feature scores for {len(checked)} rows, got {got}")
    deltas = protect_deltas(probs[checked], perturbed, statistic) if uses_rap and len(checked) else None
    by_row = {}
    for i, row in enumerate(checked.tolist()):
        limits = thresholds[int(probs[row].argmax())]
        by_row[row] = _check_row(
            limits,
            None if deltas is None else float(deltas[i]),
            None if feature_scores is None else float(feature_scores[i]),
        )
    verdicts = []
    for row, p in enumerate(probs):
        check, flagged_by, score, score_t = by_row.get(row, (RapCheck(checked=False), (), None, None))
        verdicts.append(
            Verdict(
                label=int(p.argmax()),
                probs=tuple(float(x) for x in p),
                flagged=bool(flagged_by),
                rap=check,
                flagged_by=flagged_by,
                feature_score=score,
                feature_threshold=score_t,
            )
        )
    return verdicts


def _check_row(limits: LabelThresholds, delta: float | None, score: float | None):
    flagged_by = []
    check = RapCheck(checked=False)
    if limits.rap is not None and delta is not None:
        check = RapCheck(checked=True, delta=delta, threshold=limits.rap)
        if is_flagged(delta, limits.rap):
            flagged_by.append("rap")
    shown = None
    if limits.features is not None and score is not None:
        shown = score
        if score > limits.features:
            flagged_by.append("features")
    return check, tuple(flagged_by), shown, limits.features if shown is not None else None


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
        shown = (flagged or checked or windows)[0]
        flagged_by = tuple(sorted({d for v in flagged for d in v.flagged_by}))
        first = windows[0]
        merged.append(
            Verdict(
                first.label,
                first.probs,
                bool(flagged),
                shown.rap,
                flagged_by,
                shown.feature_score,
                shown.feature_threshold,
            )
        )
    return merged
