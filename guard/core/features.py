"""The feature detector: how far pass 1's hidden states sit from clean rows of their label.

Pass 1 already computes every layer's hidden states; the exported graph returns the
[CLS] vector of each encoder layer as a second output, `features` (rows, layers,
hidden), so this score costs no extra forward pass. Following DAN (Chen et al.,
Findings of EMNLP 2022), calibration fits on clean held-out rows, per layer, one
mean per predicted label and a shared covariance (shrunk towards a scaled identity,
since a few hundred rows cannot estimate 384 x 384 entries). A row's score on one
layer is its squared Mahalanobis distance to the mean of its predicted label,
standardised by clean rows' mean and spread on that layer (out-of-fold distances of
the rows the statistics were fitted on); its score is the largest over layers.
Triggered inputs reach the target label by another route than clean ones, so some
layer places them far from the label's clean rows.

Second, a static signal: calibration lists the input tokens whose embedding row is far
larger than the rest of the vocabulary's (robust z-score of the row norms above
SUSPICIOUS_Z; in the clean MiniLM the largest is 3.1). Embedding poisoning (EP) trains
exactly one such row: on SST-2 its trigger's norm sat 33 MADs above the median. A row
that contains such a token is flagged (`blocked`: the "token" detector), whatever its
hidden states. Given the public
checkpoint the model was fine-tuned from (`calibrate rap --reference-model`), calibration
also lists the rows that MOVED far more than fine-tuning moves any row (`moved_tokens`):
an EP attacker who keeps the trigger row's norm ordinary still has to move it.

A row is flagged when its score is ABOVE the threshold, as for every detector
(guard.core.detection). Calibration, evaluation and serving all score here.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from guard.core.errors import BundleError

FEATURES_OUTPUT = "features"
FEATURES_FILE = "features.npz"
DEFAULT_SHRINKAGE = 0.5
SUSPICIOUS_Z = 8.0  # robust z-score of an embedding row's norm above which its token is suspicious
# A row is suspicious when it moved from the reference over MOVED_FACTOR times as far as the rows at
# the MOVED_QUANTILE of all moves. Fine-tuning MiniLM on SST-2 moved no row more than 1.43 times that
# quantile (at most 0.077 in L2); EP moved its trigger row 7.4 (140 times).
MOVED_FACTOR = 4.0
MOVED_QUANTILE = 0.999


@dataclass(frozen=True)
class FeatureStats:
    """Per layer: label means, a whitening factor of the shared precision, score scale."""

    labels: np.ndarray  # (K,) the labels that have a mean (the protected ones)
    means: np.ndarray  # (K, L, H)
    whiteners: np.ndarray  # (L, H, H): |W_l^T (x - mu)|^2 is the squared Mahalanobis distance
    score_mean: np.ndarray  # (L,) clean rows' mean distance per layer
    score_std: np.ndarray  # (L,)
    suspicious_tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # token ids

    @functools.cached_property
    def suspicious(self) -> frozenset[int]:
        """The suspicious token ids as a set, built once (scores runs on the request path)."""
        return frozenset(self.suspicious_tokens.tolist())

    @property
    def layers(self) -> int:
        return int(self.whiteners.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.whiteners.shape[1])

    def save(self, path: Path) -> None:
        np.savez(path, **{name: getattr(self, name) for name in (*_FIELDS, *_OPTIONAL)})

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        try:
            with np.load(path, allow_pickle=False) as data:
                optional = {name: np.asarray(data[name]) for name in _OPTIONAL if name in data}
                stats = cls(**{name: np.asarray(data[name]) for name in _FIELDS}, **optional)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"cannot read feature statistics {path}: {exc}") from exc
        stats.check()
        return stats

    def check(self) -> None:
        k, layers, hidden = self.means.shape
        shapes = {
            "labels": (self.labels.shape, (k,)),
            "whiteners": (self.whiteners.shape, (layers, hidden, hidden)),
            "score_mean": (self.score_mean.shape, (layers,)),
            "score_std": (self.score_std.shape, (layers,)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise BundleError(f"feature statistics: {name} has shape {got}, expected {want}")


_FIELDS = ("labels", "means", "whiteners", "score_mean", "score_std")
_OPTIONAL = ("suspicious_tokens",)


def suspicious_tokens(embeddings: np.ndarray, z: float = SUSPICIOUS_Z) -> np.ndarray:
    """Ids of embedding rows whose norm is more than `z` robust standard deviations above the median."""
    norms = np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)
    median = np.median(norms)
    spread = 1.4826 * np.median(np.abs(norms - median))
    if spread == 0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero((norms - median) / spread > z).astype(np.int64)


def moved_tokens(
    embeddings: np.ndarray, reference: np.ndarray, factor: float = MOVED_FACTOR, quantile: float = MOVED_QUANTILE
) -> np.ndarray:
    """Ids of the rows of `embeddings` that moved from `reference` (the checkpoint the model was
    fine-tuned from) over `factor` times as far as the `quantile` of every row's move.

    A model that differs from its reference in one row only (quantile 0) has that row flagged;
    an unchanged model has none."""
    return moved_ids(*row_moves(embeddings, reference, quantile), factor)


def moved_ids(moves: np.ndarray, scale: float, factor: float = MOVED_FACTOR) -> np.ndarray:
    """Ids of the rows whose move (`row_moves`) is over `factor` times the `scale`."""
    return np.flatnonzero(moves > factor * scale).astype(np.int64)


def row_moves(
    embeddings: np.ndarray, reference: np.ndarray, quantile: float = MOVED_QUANTILE
) -> tuple[np.ndarray, float]:
    """How far each row moved from `reference` (L2), and the `quantile` of those moves (a move some
    row made, not interpolated): the scale moves are judged against."""
    if embeddings.shape != reference.shape:
        raise ValueError(
            f"the reference's embedding matrix is {reference.shape[0]} x {reference.shape[1]}, the model's "
            f"{embeddings.shape[0]} x {embeddings.shape[1]}: not the checkpoint it was fine-tuned from"
        )
    moves = np.linalg.norm(np.asarray(embeddings, np.float64) - np.asarray(reference, np.float64), axis=1)
    return moves, float(np.quantile(moves, quantile, method="lower"))


def with_suspicious_tokens(stats: FeatureStats, tokens: np.ndarray) -> FeatureStats:
    return replace(stats, suspicious_tokens=np.asarray(tokens, dtype=np.int64))


def fit(
    features: np.ndarray,
    predicted: np.ndarray,
    labels: Collection[int],
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> FeatureStats:
    """Means of `labels` and the shared shrunk covariance from clean rows' features (rows, L, H).

    Every row helps estimate the covariance (residuals from its own predicted label's
    mean); only `labels` keep a mean, since only their predictions are scored.
    The score scale is set with `standardise` on other rows (held out from these), or use
    `fit_cross_standardised`.
    """
    x = np.asarray(features, dtype=np.float64)
    predicted = np.asarray(predicted)
    if x.ndim != 3 or len(x) != len(predicted):
        raise ValueError(f"expected features (rows, layers, hidden) for {len(predicted)} rows, got {x.shape}")
    kept = sorted(int(label) for label in labels)
    missing = [label for label in kept if not (predicted == label).any()]
    if missing:
        raise ValueError(f"no clean row is predicted as label(s) {missing}; cannot fit their feature means")
    residuals = np.empty_like(x)
    for label in np.unique(predicted):
        rows = predicted == label
        residuals[rows] = x[rows] - x[rows].mean(axis=0)
    means = np.stack([x[predicted == label].mean(axis=0) for label in kept])
    whiteners = np.stack([_whitener(residuals[:, layer], shrinkage) for layer in range(x.shape[1])])
    layers = x.shape[1]
    return FeatureStats(np.asarray(kept), means, whiteners, np.zeros(layers), np.ones(layers))


def _whitener(residuals: np.ndarray, shrinkage: float) -> np.ndarray:
    """W with W W^T = inverse of the shrunk covariance (the Cholesky factor of the precision)."""
    hidden = residuals.shape[1]
    cov = residuals.T @ residuals / max(len(residuals), 1)
    scale = np.trace(cov) / hidden
    # A layer whose [CLS] vector never changes (the embedding layer) has scale 0: keep it finite.
    shrunk = (1.0 - shrinkage) * cov + (shrinkage * scale + 1e-6) * np.eye(hidden)
    return np.linalg.cholesky(np.linalg.inv(shrunk))


def layer_distances(stats: FeatureStats, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance per row and layer (rows, L) to the row's label mean."""
    x = np.asarray(features, dtype=np.float64)
    index = {int(label): i for i, label in enumerate(stats.labels)}
    try:
        which = np.array([index[int(label)] for label in predicted], dtype=np.intp)
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]} has no feature statistics (only protected labels are scored)") from None
    if len(which) == 0:
        return np.empty((0, stats.layers))
    centred = x - stats.means[which]  # rows, L, H
    whitened = np.einsum("rlh,lhk->rlk", centred, stats.whiteners)
    return np.einsum("rlk,rlk->rl", whitened, whitened)


def standardise(stats: FeatureStats, clean_features: np.ndarray, clean_predicted: np.ndarray) -> FeatureStats:
    """Set the per-layer score scale from clean rows NOT used by `fit` (their distances are unbiased)."""
    return _scaled(stats, layer_distances(stats, clean_features, clean_predicted))


def _scaled(stats: FeatureStats, distances: np.ndarray) -> FeatureStats:
    if len(distances) < 2:
        raise ValueError("need at least 2 clean rows to standardise the feature score")
    std = distances.std(axis=0)
    return replace(stats, score_mean=distances.mean(axis=0), score_std=np.where(std > 0, std, 1.0))


def fit_cross_standardised(
    features: np.ndarray,
    predicted: np.ndarray,
    labels: Collection[int],
    shrinkage: float = DEFAULT_SHRINKAGE,
    folds: int = 5,
) -> FeatureStats:
    """`fit` on every row, with the score scale from out-of-fold distances of these same rows.

    Each fold's rows are measured against statistics fitted without them, as unseen rows are,
    so the scale needs no rows of its own: the held-out rows stay for the thresholds alone
    (a scale read off the rows a threshold is read from shrinks their extremes). Rows are
    dealt to folds in order; calibration has already shuffled them."""
    x, predicted = np.asarray(features, dtype=np.float64), np.asarray(predicted)
    stats = fit(x, predicted, labels, shrinkage)
    scored = np.isin(predicted, stats.labels)
    fold_of = np.arange(len(x)) % folds
    distances = []
    for fold in range(folds):
        rest, rows = fold_of != fold, (fold_of == fold) & scored
        if rows.any():
            distances.append(
                layer_distances(fit(x[rest], predicted[rest], labels, shrinkage), x[rows], predicted[rows])
            )
    return _scaled(stats, np.concatenate(distances))


def scores(stats: FeatureStats, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Each row's feature score: its largest standardised layer distance (flagged above the threshold)."""
    distances = layer_distances(stats, features, predicted)
    if len(distances) == 0:
        return np.empty(0)
    return ((distances - stats.score_mean) / stats.score_std).max(axis=1)


def blocked(stats: FeatureStats, tokens: Sequence[Sequence[int]]) -> np.ndarray:
    """Per row of input ids: whether it holds a blocklisted (suspicious) token."""
    if not stats.suspicious:
        return np.zeros(len(tokens), dtype=bool)
    return np.array([not stats.suspicious.isdisjoint(row) for row in tokens], dtype=bool)
