"""Thresholds of an exported graph fitted on its own scores of the held-out rows (int8 graphs move them).

The rows are scored by the offline checker (guard.core.checker), the steps the server
runs, and every threshold comes from guard.core.detection.fit_label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guard.core import detection
from guard.core.backends.base import Backend
from guard.core.backends.onnx import OnnxBackend
from guard.core.bundle import ProtectedLabel
from guard.core.checker import Checker
from guard.core.errors import InputError
from guard.core.features import FeatureStats
from guard.core.rap import Statistic
from guard.core.runner import TwoPass
from guard.core.tokenizer import RapTokenizer
from guard.core.types import LabelThresholds


@dataclass(frozen=True)
class HeldOut:
    """The held-out clean rows and what to fit on them."""

    tokenizer: RapTokenizer
    texts: Sequence[str]
    protect: Sequence[int]
    labels: Sequence[str]  # label names by id
    statistic: Statistic
    frr_targets: Sequence[float]
    stats: FeatureStats | None = None  # the feature detector, when the bundle has it
    floors: Mapping[int, float] = field(default_factory=dict)  # the floored statistic's, from fp32 calibration
    reader: Path | None = None  # the reader detector's graph, when the bundle has it
    switch_id: int | None = None  # the switch detector's word, when the bundle has it

    def scores(self, graph: Path) -> detection.RowScores:
        """`graph`'s scores of every held-out row (any threshold checks the same rows)."""
        on = LabelThresholds(
            0.0, None if self.stats is None else 0.0, None if self.reader is None else 0.0,
            None if self.switch_id is None else 0.0,
        )  # fmt: skip
        two_pass = TwoPass(
            self.tokenizer, dict.fromkeys(self.protect, on), self.statistic, self.stats, len(self.labels),
            floors=self.floors, switch_id=self.switch_id,
        )  # fmt: skip
        backend = OnnxBackend(graph)
        reader = None if self.reader is None else OnnxBackend(self.reader)
        try:
            return Checker(two_pass, backend, reader=reader).scores(self.texts)
        finally:
            backend.close()
            if reader is not None:
                reader.close()

    def fit(self, graph: Path, reference: Path) -> tuple[list[ProtectedLabel], float]:
        """Thresholds of `graph`, and the share of rows it predicts as `reference` does."""
        scores = self.scores(graph)
        predicted = scores.predicted
        protected = []
        for label in self.protect:
            rows = (predicted == label) & ~np.isnan(scores.rap)
            if not rows.any():
                raise InputError(f"{graph.name} never predicts protect label {label} on the held-out rows")
            features = None if self.stats is None else scores.features[rows]
            blocked = None if self.stats is None else scores.token[rows]
            reader = None if self.reader is None else scores.reader[rows]
            switch = None if self.switch_id is None else scores.switch[rows]
            fitted = detection.fit_label(
                label, self.labels[label], self.frr_targets, scores.rap[rows], features, blocked,
                self.floors.get(label), reader, switch,
            )  # fmt: skip
            protected.append(fitted)
        agreement = float(np.mean(predicted == self.scores(reference).predicted))
        return protected, agreement


def label_scores(
    two_pass: TwoPass, model: Backend, texts: Sequence[str], label: int, detector: str, reader: Backend | None = None
) -> np.ndarray:
    """One detector's scores of `texts` (held-out rows the suspect predicts as `label`, as torch read them) through
    the server's steps, aligned with them; a row the exported graph predicts otherwise (a torch/ONNX tie) is never
    flagged (-inf)."""
    rows = Checker(two_pass, model, reader=reader).scores(texts)
    first = detection.first_windows(rows.owner)
    score = getattr(rows, detector)[first]
    return np.where(rows.predicted[first] == label, score, -np.inf)
