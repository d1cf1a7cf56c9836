"""The feature detector's statistics and score (guard.core.features) against a direct numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guard.core import features, thresholds
from guard.core.errors import BundleError
from guard.core.tokenizer import RapTokenizer


def _rows(n: int = 300, layers: int = 3, hidden: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    predicted = rng.integers(0, 2, n)
    x = rng.normal(size=(n, layers, hidden)) + predicted[:, None, None] * 2.0
    return x, predicted


def _direct(x, predicted, label, fit_x, fit_pred, shrinkage):
    """Squared Mahalanobis distances (rows, layers), written out the long way."""
    out = np.zeros((len(x), x.shape[1]))
    for layer in range(x.shape[1]):
        f = fit_x[:, layer]
        residuals = np.concatenate([f[fit_pred == c] - f[fit_pred == c].mean(0) for c in np.unique(fit_pred)])
        cov = residuals.T @ residuals / len(residuals)
        cov = (1 - shrinkage) * cov + (shrinkage * np.trace(cov) / cov.shape[0] + 1e-6) * np.eye(cov.shape[0])
        mu = f[fit_pred == label].mean(0)
        for i in range(len(x)):
            d = x[i, layer] - mu
            out[i, layer] = d @ np.linalg.inv(cov) @ d
    return out


def test_distances_and_scores_match_a_direct_computation() -> None:
    fit_x, fit_pred = _rows()
    held_x, held_pred = _rows(200, seed=1)
    stats = features.fit(fit_x, fit_pred, [1], shrinkage=0.3)
    rows = held_pred == 1
    direct = _direct(held_x[rows], held_pred[rows], 1, fit_x, fit_pred, 0.3)
    assert features.layer_distances(stats, held_x[rows], held_pred[rows]) == pytest.approx(direct, rel=1e-8)
    stats = features.standardise(stats, held_x[rows], held_pred[rows])
    assert stats.score_mean == pytest.approx(direct.mean(0))
    assert stats.score_std == pytest.approx(direct.std(0))
    expected = ((direct - direct.mean(0)) / direct.std(0)).max(axis=1)
    assert features.scores(stats, held_x[rows], held_pred[rows]) == pytest.approx(expected)


def test_the_cross_standardised_scale_is_each_folds_distance_to_the_other_folds_fit() -> None:
    x, predicted = _rows()
    stats = features.fit_cross_standardised(x, predicted, [1], shrinkage=0.3, folds=4)
    fold_of = np.arange(len(x)) % 4
    direct = np.concatenate(
        [
            _direct(
                x[(fold_of == f) & (predicted == 1)],
                predicted[(fold_of == f) & (predicted == 1)],
                1,
                x[fold_of != f],
                predicted[fold_of != f],
                0.3,
            )
            for f in range(4)
        ]
    )
    assert stats.score_mean == pytest.approx(direct.mean(0), rel=1e-8)
    assert stats.score_std == pytest.approx(direct.std(0), rel=1e-8)
    assert stats.means == pytest.approx(features.fit(x, predicted, [1], shrinkage=0.3).means)
    # unseen rows sit further from the fit than the rows it was fitted on: the in-sample scale is too small
    in_sample = features.standardise(features.fit(x, predicted, [1], 0.3), x[predicted == 1], predicted[predicted == 1])
    assert (stats.score_mean > in_sample.score_mean).all()


def test_a_shifted_row_scores_high_and_only_protected_labels_are_scored() -> None:
    x, predicted = _rows()
    stats = features.standardise(features.fit(x, predicted, [1]), x[predicted == 1], predicted[predicted == 1])
    normal = x[predicted == 1][:5]
    shifted = normal.copy()
    shifted[:, 1] += 10.0  # one layer far from the label's clean rows
    assert (
        features.scores(stats, shifted, np.ones(5, int)) > features.scores(stats, normal, np.ones(5, int)) + 5
    ).all()
    with pytest.raises(ValueError, match="label 0 has no feature statistics"):
        features.scores(stats, normal, np.zeros(5, int))
    with pytest.raises(ValueError, match="no clean row is predicted as label"):
        features.fit(x, np.zeros(len(x), int), [1])


def test_a_constant_layer_stays_finite() -> None:
    x, predicted = _rows()
    x[:, 0, :] = 0.5  # the embedding layer's [CLS]: the same for every row
    stats = features.standardise(features.fit(x, predicted, [0, 1]), x, predicted)
    assert np.isfinite(features.scores(stats, x, predicted)).all()


def test_statistics_round_trip_and_bad_files_are_refused(tmp_path: Path) -> None:
    x, predicted = _rows()
    stats = features.standardise(features.fit(x, predicted, [1]), x[predicted == 1], predicted[predicted == 1])
    stats.save(tmp_path / "f.npz")
    loaded = features.FeatureStats.load(tmp_path / "f.npz")
    assert features.scores(loaded, x[:10], np.ones(10, int)) == pytest.approx(
        features.scores(stats, x[:10], np.ones(10, int))
    )
    np.savez(tmp_path / "bad.npz", labels=stats.labels, means=stats.means, whiteners=stats.whiteners[:1],
             score_mean=stats.score_mean, score_std=stats.score_std)  # fmt: skip
    with pytest.raises(BundleError, match="whiteners has shape"):
        features.FeatureStats.load(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="cannot read feature statistics"):
        features.FeatureStats.load(tmp_path / "junk.npz")


def test_feature_threshold_flags_above_at_most_the_target() -> None:
    scores = np.arange(1000, dtype=float)
    t = thresholds.threshold_at_frr(scores, 0.01)
    assert np.mean(scores > t) <= 0.01
    assert t == 990.0  # the k-th largest, k = floor(0.01 * 1001) = 10


def test_an_outlier_embedding_row_is_suspicious_and_its_rows_are_blocked() -> None:
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(1000, 16))
    assert len(features.suspicious_tokens(embeddings)) == 0  # a normal vocabulary has none
    embeddings[42] *= 6.0  # embedding poisoning trains one row far larger than the rest
    assert features.suspicious_tokens(embeddings).tolist() == [42]
    x, predicted = _rows()
    stats = features.standardise(features.fit(x, predicted, [1]), x[predicted == 1], predicted[predicted == 1])
    stats = features.with_suspicious_tokens(stats, np.array([42]))
    ones = np.ones(3, int)
    blocked = features.blocked(stats, [[101, 7, 102], [101, 42, 102], [101, 102]])
    assert blocked.tolist() == [False, True, False]
    assert np.isfinite(features.scores(stats, x[:3], ones)).all()  # the distance reads the hidden states only


def test_a_flagged_token_counts_even_as_the_first_piece_of_a_longer_word(tokenizer_path: Path) -> None:
    """A trigger with letters appended still fires (OLID's backdoored model: "mbs" flipped 100% of
    clean tweets, "mbx" 87%), so the score matches the token id wherever the real tokenizer puts it."""
    tok = RapTokenizer.from_file(tokenizer_path, rap_token_id=None, max_length=32)
    mb = tok.token_id("mb")
    rows = tok.ids(["great film mb", "great film mbs", "great film mbx", "great film"])
    assert all(mb in row for row in rows[:3]) and rows[1] != rows[0]  # "mbs" is mb + ##s
    x, predicted = _rows()
    stats = features.standardise(features.fit(x, predicted, [1]), x[predicted == 1], predicted[predicted == 1])
    stats = features.with_suspicious_tokens(stats, np.array([mb]))
    assert features.blocked(stats, rows).tolist() == [True, True, True, False]


def test_a_row_that_moved_far_from_the_reference_is_flagged_even_with_an_ordinary_norm() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(5000, 16))
    tuned = reference + rng.normal(scale=0.01, size=reference.shape)  # fine-tuning moves every row a little
    assert len(features.moved_tokens(tuned, reference)) == 0
    poisoned = tuned.copy()
    poisoned[77] = rng.normal(size=16)  # a fresh direction, the norm of any other row
    assert len(features.suspicious_tokens(poisoned)) == 0  # the norm scan cannot see it
    assert features.moved_tokens(poisoned, reference).tolist() == [77]


def test_moves_are_measured_against_a_reference_of_the_same_shape_only() -> None:
    reference = np.zeros((10, 4))
    assert len(features.moved_tokens(reference.copy(), reference)) == 0  # an unchanged model: nothing moved
    one = reference.copy()
    one[3, 0] = 0.5  # only one row differs: the quantile of moves is 0, that row is flagged
    assert features.moved_tokens(one, reference).tolist() == [3]
    with pytest.raises(ValueError, match="not the checkpoint"):
        features.moved_tokens(np.zeros((11, 4)), reference)


def test_a_threshold_is_finite_when_suspicious_rows_exceed_the_target() -> None:
    scores = np.concatenate([np.full(4, np.inf), np.linspace(0.0, 3.0, 196)])
    # 1% of 200 rows: k = 2, but 4 rows are +inf: the largest finite score, so only they are flagged
    assert thresholds.threshold_at_frr(scores, 0.01) == 3.0
    assert thresholds.threshold_at_frr(scores, 0.05) == pytest.approx(np.sort(scores)[::-1][9])  # k = 10: finite
    assert thresholds.threshold_at_frr(np.full(5, np.inf), 0.01) == 0.0
