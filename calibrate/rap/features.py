"""Fit the feature detector (guard.core.features) on the clean rows calibration already holds.

The suspicious tokens come from the model's own embedding matrix. The means and the
shared covariance come from the rows the RAP row trained on (every label); the score
scale and the thresholds from the held-out rows, the same rows, in the same order, as
RAP's held-out deltas, so the two detectors' thresholds can be chosen together
(guard.core.thresholds.joint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from calibrate.model import predict_with_features
from calibrate.rap.perturbation import RapResult
from guard.core import features
from guard.core.tokenizer import RapTokenizer


@dataclass(frozen=True)
class FeatureFit:
    stats: features.FeatureStats
    scores: dict[int, np.ndarray]  # protect label -> held-out scores, aligned with its RAP deltas
    fit_rows: int
    suspicious: list[str]  # tokens whose embedding norm is an outlier (an EP-style trigger?)


def fit_feature_detector(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    result: RapResult,
    shrinkage: float = features.DEFAULT_SHRINKAGE,
    progress: bool = False,
) -> FeatureFit:
    train_probs, train_features = predict_with_features(model, tokenizer, result.train_texts, progress=progress)
    stats = features.fit(train_features, train_probs.argmax(axis=1), list(result.fits), shrinkage)
    held_out = {
        label: predict_with_features(model, tokenizer, fit.texts, progress=progress)[1]
        for label, fit in result.fits.items()
    }
    rows = np.concatenate(list(held_out.values()))
    predicted = np.concatenate([np.full(len(f), label) for label, f in held_out.items()])
    stats = features.standardise(stats, rows, predicted)
    embeddings = model.get_input_embeddings().weight.detach().numpy()[: result.token_id]  # not the RAP row
    stats = features.with_suspicious_tokens(stats, features.suspicious_tokens(embeddings))
    scores = {
        label: features.scores(stats, f, np.full(len(f), label), tokenizer.ids(result.fits[label].texts))
        for label, f in held_out.items()
    }
    suspicious = [tokenizer.token_text(int(t)) for t in stats.suspicious_tokens]
    return FeatureFit(stats, scores, len(result.train_texts), suspicious)
