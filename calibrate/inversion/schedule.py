"""The hardening scheduler as pure functions: binary and exhaustive length search,
keeping the two directions of a label pair in step, running lower bounds, eps-mA^2."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from guard.core.errors import InputError

# ------------------------------------------------------------------ the scheduler, as pure functions


class Scored(Protocol):
    asr: float


@dataclass(frozen=True)
class LengthSearch:
    """The trigger a length search settled on; `probes` lists the lengths inverted, in order."""

    length: int
    trigger: Scored  # an Inversion when hardening
    reached: bool  # its ASR reached the bound
    probes: tuple[int, ...]
    exhaustive: bool = False


def binary_length_search(invert: Callable[[int], Scored], lower: int, upper: int, bound: float) -> LengthSearch:
    """The smallest length in [1, upper] whose inverted trigger reaches ASR `bound` (Algorithm 2).

    Lines 3-8: the running-average `lower` may not be a lower bound for this batch, so
    while the trigger at `lower` already reaches the bound, halve it. Lines 9-14: bisect
    between a length known to fail and one known (or assumed, for `upper`) to reach it,
    assuming monotone ASR in length (Definition II). Algorithm 2 as printed returns
    m_min, the failing side, and whichever trigger was generated last; this returns the
    smallest length that reached the bound and its trigger, which is what the text
    describes. If not even `upper` reaches it, `upper` and its trigger come back with
    `reached=False`. About log2(upper - lower) inversions; each length at most once.
    """
    found: dict[int, Scored] = {}

    def probe(length: int) -> Scored:
        if length not in found:
            found[length] = invert(length)
        return found[length]

    low, high = max(1, min(lower, upper)), upper
    while probe(low).asr >= bound:
        high = low
        if low == 1:
            return LengthSearch(1, found[1], True, tuple(found))
        low = max(1, low // 2)
    while high - low > 1:
        middle = (low + high) // 2
        if probe(middle).asr >= bound:
            high = middle
        else:
            low = middle
    trigger = probe(high)
    return LengthSearch(high, trigger, trigger.asr >= bound, tuple(found))


def exhaustive_search(invert: Callable[[int], Scored], below: int, bound: float) -> LengthSearch:
    """Every length 1..below-1; the trigger with the highest ASR (Sec. 4.2, appendix D)."""
    found = {length: invert(length) for length in range(1, below)}
    length = max(found, key=lambda m: found[m].asr)
    return LengthSearch(length, found[length], found[length].asr >= bound, tuple(found), exhaustive=True)


@dataclass(frozen=True)
class Sync:
    """Algorithm 1 lines 5-13 for directions forward (i->j) and backward (j->i)."""

    regenerate: str | None  # "forward" or "backward": re-invert that direction at the other's length

    @property
    def update_forward(self) -> bool:
        return self.regenerate != "forward"

    @property
    def update_backward(self) -> bool:
        return self.regenerate != "backward"


def synchronise(forward_length: int, backward_length: int, gap: int) -> Sync:
    """The direction needing a trigger `gap` or more tokens longer has more progress: hold it back."""
    if forward_length - backward_length >= gap:
        return Sync("forward")
    if backward_length - forward_length >= gap:
        return Sync("backward")
    return Sync(None)


class RunningMean:
    """The running-average lower bound lambda of one direction (Algorithm 1 lines 1, 7, 10, 12)."""

    def __init__(self) -> None:
        self.value = 1.0
        self.count = 0

    def add(self, length: int) -> None:
        self.count += 1
        self.value += (length - self.value) / self.count

    def bound(self, upper: int) -> int:
        return max(1, min(upper, int(round(self.value))))


def eps_mean_average_asr(asr: np.ndarray) -> float:
    """Definition I (eq. 3): the mean of ASR[i, j, m] over i != j and m = 1..epsilon.

    `asr` has shape (n, n, epsilon); the diagonal is ignored, and so are NaN entries
    (pairs whose victim label had no rows to measure on).
    """
    n = asr.shape[0]
    off_diagonal = ~np.eye(n, dtype=bool)
    values = asr[off_diagonal]
    if np.isnan(values).all():
        raise InputError(
            "no label pair could be measured: every label needs 2+ correctly classified held-out rows "
            "(more clean rows, a larger holdout fraction, or no measurement)"
        )
    return float(np.nanmean(values))
