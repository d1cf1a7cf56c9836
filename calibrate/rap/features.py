"""Fit the feature detector (guard.core.features) on the clean rows calibration already holds.

The suspicious tokens come from the model's own embedding matrix (outlier norms), from what
candidate tokens do when inserted into clean rows (the flip scan, calibrate.rap.token_scan)
and, given the checkpoint the model was fine-tuned from, from how far each row moved. The means, the
shared covariance and the score scale (out of fold) come from the rows the RAP row
trained on (every label); the thresholds from the held-out rows alone, the same rows, in
the same order, as RAP's held-out scores, so the two detectors' thresholds can be chosen
together (guard.core.detection.fit_label).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibrate.inversion.subject import Subject
from calibrate.model import predict_with_features
from calibrate.rap.perturbation import RapResult
from calibrate.rap.token_scan import TokenFlip, flip_scan
from guard.core import features
from guard.core.errors import InputError


@dataclass(frozen=True)
class FeatureFit:
    stats: features.FeatureStats
    scores: dict[int, np.ndarray]  # protect label -> held-out distance scores, aligned with its RAP scores
    blocked: dict[int, np.ndarray]  # protect label -> whether each of those rows holds a blocklisted token
    fit_rows: int
    suspicious: list[str]  # tokens whose embedding norm is an outlier (an EP-style trigger?)
    moved: list[str] | None = None  # tokens whose row moved far from the reference (None: no reference given)
    flip_scan: list[TokenFlip] = field(default_factory=list)  # the candidate tokens' flip rates

    @property
    def flipped(self) -> list[str]:
        """Tokens the flip scan flagged (a rare-word trigger?)."""
        return [f.token for f in self.flip_scan if f.flagged]


def _row_moves(embeddings: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    try:
        return features.row_moves(embeddings, reference)
    except ValueError as exc:
        raise InputError(f"--reference-model: {exc}") from None


def _fit(x: np.ndarray, predicted: np.ndarray, labels: list[int], shrinkage: float) -> features.FeatureStats:
    try:
        return features.fit_cross_standardised(x, predicted, labels, shrinkage)
    except ValueError as exc:  # a protect label some fold never predicts: too few training rows
        raise InputError(f"feature detector: {exc}; pass a larger --clean file") from None


def fit_feature_detector(
    subject: Subject,
    result: RapResult,
    shrinkage: float = features.DEFAULT_SHRINKAGE,
    progress: bool = False,
    reference: np.ndarray | None = None,
) -> FeatureFit:
    """`subject`: the model (with its RAP row), its tokenizer and the vocabulary the flip scan's trigger
    search may pick; `reference`: the input embeddings of the checkpoint the model was fine-tuned from,
    if known."""
    model, tokenizer = subject.model, subject.tokenizer
    train_probs, train_features = predict_with_features(model, tokenizer, result.train_texts, progress=progress)
    predicted = train_probs.argmax(axis=1)
    stats = _fit(train_features, predicted, list(result.fits), shrinkage)
    held_out = {
        label: predict_with_features(model, tokenizer, fit.texts, progress=progress)[1]
        for label, fit in result.fits.items()
    }
    embeddings = model.get_input_embeddings().weight.detach().numpy()[: result.token_id]  # not the RAP row
    outliers = features.suspicious_tokens(embeddings)
    moved, moves = None, None
    if reference is not None:
        moves = _row_moves(embeddings, reference)
        moved = features.moved_ids(*moves)
    flips = flip_scan(subject, result.train_texts, predicted, list(result.fits), moves, progress)
    flagged = [f.token_id for f in flips if f.flagged]
    suspicious = np.union1d(np.union1d(outliers, [] if moved is None else moved), flagged).astype(np.int64)
    stats = features.with_suspicious_tokens(stats, suspicious)
    scores = {label: features.scores(stats, f, np.full(len(f), label)) for label, f in held_out.items()}
    blocked = {label: features.blocked(stats, tokenizer.ids(fit.texts)) for label, fit in result.fits.items()}
    names = [tokenizer.token_text(int(t)) for t in outliers]
    moved_names = None if moved is None else [tokenizer.token_text(int(t)) for t in moved]
    return FeatureFit(stats, scores, blocked, len(result.train_texts), names, moved_names, flips)
