"""Records that flow between stages. Plain dataclasses, numpy inside."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Example:
    """One labelled text row (clean or poisoned)."""

    text: str
    label: int


@dataclass(frozen=True)
class EncodedBatch:
    """Model inputs for a batch, padded to the longest row.

    All arrays are int64 of shape (batch, seq_len), the layout BERT-family
    ONNX graphs and torch models take.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def as_feeds(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


@dataclass(frozen=True)
class RapCheck:
    """The RAP second pass for one input, when it ran: its score (guard.core.rap) and threshold."""

    checked: bool
    score: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class LabelThresholds:
    """What flags a row predicted as one protected label: a score above its detector's threshold
    (None: that detector is off). A blocklisted token flags a row wherever `features` is on."""

    rap: float | None = None
    features: float | None = None
    reader: float | None = None
    switch: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What the guard decided about one input."""

    label: int
    probs: tuple[float, ...]
    flagged: bool
    rap: RapCheck
    flagged_by: tuple[str, ...] = ()  # the detectors that flagged it: "rap", "features", "token", "reader", "switch"
    feature_score: float | None = None  # its feature distance score, when the feature detector scored it
    feature_threshold: float | None = None
