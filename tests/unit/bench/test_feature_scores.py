"""bench.feature_scores: BadActs' activation bounds and the AUC, against direct computations."""

from __future__ import annotations

import numpy as np

from bench import feature_scores
from bench.feature_scores import activation_bounds, auc, compare


def test_activation_bounds_count_the_neurons_outside_each_labels_clean_interval() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2, 3))
    x[200:] += 5.0  # label 1's rows sit elsewhere
    predicted = np.repeat([0, 1], 200)
    share = activation_bounds(x, predicted, [0, 1], k=2.0, excess=False)
    excess = activation_bounds(x, predicted, [0, 1], k=2.0, excess=True)
    probe = np.zeros((1, 2, 3))
    probe[0, 0, 0] = 10.0  # one neuron far out for label 0
    flat = x[:200].reshape(200, -1)
    z = np.abs(probe.reshape(1, -1) - flat.mean(axis=0)) / (flat.std(axis=0) + 1e-6)
    assert share(probe, np.array([0]))[0] == np.mean(z > 2.0)
    assert np.isclose(excess(probe, np.array([0]))[0], np.maximum(z - 2.0, 0).mean())
    # the same probe read against label 1's interval: every neuron is out
    assert share(probe, np.array([1]))[0] == 1.0


def test_auc_is_the_share_of_pairs_ranked_right_with_ties_half() -> None:
    clean, poisoned = np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0])
    pairs = [(p > c) + 0.5 * (p == c) for p in poisoned for c in clean]
    assert auc(clean, poisoned) == np.mean(pairs)


def test_a_score_that_separates_the_poisoned_rows_lets_none_through_at_the_target_frr() -> None:
    rng = np.random.default_rng(1)

    def rows(n: int, shift: float) -> np.ndarray:
        return rng.normal(size=(n, 2, 4)) + shift

    x = {"fit": rows(300, 0.0), "held_out": rows(300, 0.0), "test": rows(300, 0.0), "poisoned": rows(100, 6.0)}
    predicted = {k: np.ones(len(v), dtype=int) for k, v in x.items()}
    predicted["fit"][:150] = 0
    found = compare("toy", x, predicted, [0, 1])
    at_5 = {r["score"]: r for r in found if r["frr_target"] == 0.05}
    assert set(at_5) == {"dan", "dan-mean", "bounds", "bounds-excess"}
    assert all(r["test_far"] == 0.0 and r["auc"] == 1.0 and r["test_frr"] < 0.12 for r in at_5.values())


def test_attention_statistics_summarise_where_cls_attends_per_layer_and_head(tiny_model_dir) -> None:
    from calibrate.inversion.subject import load_subject

    subject = load_subject(tiny_model_dir, max_length=16)
    texts = ["a short one", "a somewhat longer sentence than the first one is"]
    predicted, stats = feature_scores.attention_statistics(subject.model, subject.tokenizer, texts)
    config = subject.model.config
    assert predicted.shape == (2,) and stats.shape == (2, config.num_hidden_layers, config.num_attention_heads * 4)
    entropy, largest, on_cls, on_last = (stats.reshape(2, config.num_hidden_layers, -1, 4)[..., i] for i in range(4))
    lengths = [len(subject.tokenizer.encode([t]).input_ids[0]) for t in texts]
    for row, n in enumerate(lengths):  # attention over n real tokens: entropy within [0, log n], weights in [0, 1]
        assert (entropy[row] >= -1e-6).all() and (entropy[row] <= np.log(n) + 1e-5).all()
    assert ((largest >= on_cls - 1e-7) & (largest >= on_last - 1e-7) & (largest <= 1 + 1e-6)).all()
    _, alone = feature_scores.attention_statistics(subject.model, subject.tokenizer, texts[:1])
    np.testing.assert_allclose(alone[0], stats[0], atol=1e-5)  # padding in the batch does not move a row
