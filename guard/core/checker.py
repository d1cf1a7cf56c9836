"""Synchronous two-pass check: texts -> verdicts.

Used offline (evaluation, `guard check`, the demo). The server wraps the same
steps around its micro-batcher; both end in `rap.decide`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from guard.core import features, rap
from guard.core.backends.base import Backend
from guard.core.tokenizer import RapTokenizer
from guard.core.types import LabelThresholds, Verdict


@dataclass(frozen=True)
class Scores:
    """Pass-1 probabilities for all rows; pass-2 ones and feature scores for the eligible rows."""

    probs: np.ndarray
    checked_rows: np.ndarray
    perturbed: np.ndarray
    statistic: rap.Statistic = "prob"
    checked_features: np.ndarray = field(default_factory=lambda: np.empty(0))  # feature score per checked row

    def deltas(self) -> np.ndarray:
        """delta per row, NaN where pass 2 did not run."""
        out = np.full(len(self.probs), np.nan)
        if len(self.checked_rows):
            out[self.checked_rows] = rap.protect_deltas(self.probs[self.checked_rows], self.perturbed, self.statistic)
        return out

    @property
    def feature_scores(self) -> np.ndarray:
        """Feature score per row, NaN where it was not computed."""
        out = np.full(len(self.probs), np.nan)
        if len(self.checked_features):
            out[self.checked_rows] = self.checked_features
        return out


class Checker:
    def __init__(
        self,
        tokenizer: RapTokenizer,
        backend: Backend,
        batch_size: int = 32,
        statistic: rap.Statistic = "prob",
        features: features.FeatureStats | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.batch_size = batch_size
        self.statistic = statistic
        self.features = features

    @classmethod
    def for_bundle(cls, bundle, backend: Backend, detectors=None) -> Checker:
        """A checker with the bundle's statistic and, when `detectors` (default: the bundle's) include
        it, its feature detector."""
        detectors = bundle.detectors if detectors is None else tuple(detectors)
        stats = bundle.feature_stats() if "features" in detectors else None
        return cls(bundle.tokenizer(), backend, statistic=bundle.manifest.statistic, features=stats)

    def check(self, texts: Sequence[str], thresholds: Mapping[int, LabelThresholds | float]) -> list[Verdict]:
        labels = {label: _as_label_thresholds(t) for label, t in thresholds.items()}
        scores = self.score(texts, labels.keys())
        return rap.decide_all(scores.probs, scores.perturbed, labels, self.statistic, scores.checked_features)

    def score(self, texts: Sequence[str], protect_labels: Sequence[int]) -> Scores:
        """Run pass 1 on all texts and pass 2 on those predicted as a protected label."""
        texts = list(texts)
        probs, feats = self._pass1(texts)
        rows = rap.eligible_rows(probs, list(protect_labels))
        perturbed = self._probs([texts[i] for i in rows], self.tokenizer.encode_perturbed)
        checked = np.empty(0)
        if self.features is not None and len(rows):
            tokens = self.tokenizer.ids([texts[i] for i in rows])
            checked = features.scores(self.features, feats[rows], probs[rows].argmax(axis=1), tokens)
        return Scores(probs, rows, perturbed, self.statistic, checked)

    def _pass1(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        if self.features is None:
            return self._probs(texts, self.tokenizer.encode), None
        probs, feats = [], []
        for i in range(0, len(texts), self.batch_size):
            logits, f = self.backend.infer_with_features(self.tokenizer.encode(texts[i : i + self.batch_size]))
            probs.append(rap.softmax(logits))
            feats.append(f)
        if not probs:
            return np.empty((0, 0)), np.empty((0, 0, 0))
        return np.concatenate(probs), np.concatenate(feats)

    def _probs(self, texts: list[str], encode) -> np.ndarray:
        chunks = [
            rap.softmax(self.backend.infer(encode(texts[i : i + self.batch_size])))
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.empty((0, 0))


def _as_label_thresholds(threshold: LabelThresholds | float) -> LabelThresholds:
    return threshold if isinstance(threshold, LabelThresholds) else LabelThresholds(float(threshold), None)
