"""Synchronous two-pass RAP check: texts -> verdicts.

Used offline (evaluation, `guard check`, the demo). The server wraps the same
steps around its micro-batcher; both end in `rap.decide`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from guard.core import rap
from guard.core.backends.base import Backend
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Verdict


@dataclass(frozen=True)
class Scores:
    """Pass-1 probabilities for all rows; pass-2 ones for the eligible rows."""

    probs: np.ndarray
    checked_rows: np.ndarray
    perturbed: np.ndarray
    statistic: rap.Statistic = "prob"

    def deltas(self) -> np.ndarray:
        """delta per row, NaN where pass 2 did not run."""
        out = np.full(len(self.probs), np.nan)
        if len(self.checked_rows):
            out[self.checked_rows] = rap.protect_deltas(self.probs[self.checked_rows], self.perturbed, self.statistic)
        return out


class Checker:
    def __init__(
        self, tokenizer: RapTokenizer, backend: Backend, batch_size: int = 32, statistic: rap.Statistic = "prob"
    ) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.batch_size = batch_size
        self.statistic = statistic

    def check(self, texts: Sequence[str], thresholds: Mapping[int, float]) -> list[Verdict]:
        scores = self.score(texts, thresholds.keys())
        return rap.decide(scores.probs, scores.perturbed, thresholds, self.statistic)

    def score(self, texts: Sequence[str], protect_labels: Sequence[int]) -> Scores:
        """Run pass 1 on all texts and pass 2 on those predicted as a protected label."""
        texts = list(texts)
        probs = self._probs(texts, self.tokenizer.encode)
        rows = rap.eligible_rows(probs, list(protect_labels))
        perturbed = self._probs([texts[i] for i in rows], self.tokenizer.encode_perturbed)
        return Scores(probs=probs, checked_rows=rows, perturbed=perturbed, statistic=self.statistic)

    def _probs(self, texts: list[str], encode) -> np.ndarray:
        chunks = [
            rap.softmax(self.backend.infer(encode(texts[i : i + self.batch_size])))
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.empty((0, 0))
