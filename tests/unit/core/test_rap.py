"""The RAP decision rule (guard.core.rap) with hand-made probabilities.

Probabilities are dyadic fractions (0.125, 0.25, ...) so deltas are exact in
binary floating point and the expected values can be written down.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from guard.core import rap
from guard.core.types import RapCheck, Verdict


def test_softmax_known_values() -> None:
    probs = rap.softmax(np.array([[0.0, 0.0], [0.0, math.log(3.0)], [math.log(2.0), 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75], [2 / 3, 1 / 3]], rtol=0, atol=1e-15)
    assert probs.dtype == np.float64


def test_softmax_is_stable_for_large_logits_and_float32_input() -> None:
    probs = rap.softmax(np.array([[1000.0, 1000.0], [-1000.0, 1000.0]], dtype=np.float32))
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.0, 1.0]], atol=1e-15)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_eligible_rows_are_rows_predicted_as_a_protected_label() -> None:
    probs = np.array(
        [
            [0.75, 0.125, 0.125],  # 0
            [0.125, 0.75, 0.125],  # 1
            [0.125, 0.125, 0.75],  # 2
            [0.5, 0.25, 0.25],  # 0
        ]
    )
    assert rap.eligible_rows(probs, [1]).tolist() == [1]
    assert rap.eligible_rows(probs, {1, 2}).tolist() == [1, 2]
    assert rap.eligible_rows(probs, [0]).tolist() == [0, 3]
    assert rap.eligible_rows(probs, []).tolist() == []


def test_protect_deltas_are_taken_on_each_rows_pass1_label() -> None:
    probs = np.array([[0.25, 0.75], [0.875, 0.125]])
    perturbed = np.array([[0.5, 0.5], [0.9375, 0.0625]])
    # row 0: label 1, 0.75 - 0.5; row 1: label 0, 0.875 - 0.9375 (perturbation raised it)
    assert rap.protect_deltas(probs, perturbed).tolist() == [0.25, -0.0625]


def test_flagged_iff_delta_below_threshold() -> None:
    assert rap.is_flagged(0.0, 0.1)
    assert not rap.is_flagged(0.1, 0.1)  # equal is clean: the rule is strict "<"
    assert not rap.is_flagged(0.2, 0.1)
    assert rap.is_flagged(-0.5, 0.1)
    assert rap.flagged_mask(np.array([0.05, 0.1, 0.15]), 0.1).tolist() == [True, False, False]


# Three labels, two of them protected with different thresholds.
THRESHOLDS = {1: 0.25, 2: 0.125}
PROBS = np.array(
    [
        [0.75, 0.125, 0.125],  # r0 label 0: not protected, never checked
        [0.125, 0.75, 0.125],  # r1 label 1: delta 0.25, equal to its threshold -> clean
        [0.125, 0.125, 0.75],  # r2 label 2: delta 0 -> flagged
        [0.0625, 0.875, 0.0625],  # r3 label 1: delta 0.125 < 0.25 -> flagged
        [0.25, 0.25, 0.5],  # r4 label 2: delta 0.25 >= 0.125 -> clean
    ]
)
PERTURBED = np.array(  # pass 2 for rows 1, 2, 3, 4 (the eligible ones), in that order
    [
        [0.25, 0.5, 0.25],
        [0.125, 0.125, 0.75],
        [0.0625, 0.75, 0.1875],
        [0.25, 0.5, 0.25],
    ]
)


def test_decide_multiclass_with_per_label_thresholds() -> None:
    verdicts = rap.decide(PROBS, PERTURBED, THRESHOLDS)
    assert verdicts == [
        Verdict(label=0, probs=(0.75, 0.125, 0.125), flagged=False, rap=RapCheck(checked=False)),
        Verdict(label=1, probs=(0.125, 0.75, 0.125), flagged=False, rap=RapCheck(True, 0.25, 0.25)),
        Verdict(label=2, probs=(0.125, 0.125, 0.75), flagged=True, rap=RapCheck(True, 0.0, 0.125), flagged_by=("rap",)),
        Verdict(
            label=1, probs=(0.0625, 0.875, 0.0625), flagged=True, rap=RapCheck(True, 0.125, 0.25), flagged_by=("rap",)
        ),
        Verdict(label=2, probs=(0.25, 0.25, 0.5), flagged=False, rap=RapCheck(True, 0.25, 0.125)),
    ]


def test_decide_threshold_is_the_one_of_the_predicted_label() -> None:
    # r3's delta (0.125) would pass under label 2's threshold; it is judged by label 1's.
    swapped = rap.decide(PROBS, PERTURBED, {1: 0.125, 2: 0.25})
    assert [v.flagged for v in swapped] == [False, False, True, False, False]


def test_decide_unprotected_rows_are_neither_checked_nor_flagged() -> None:
    verdicts = rap.decide(PROBS, PERTURBED[[0, 2]], {1: 1.0})  # only label 1 protected: rows 1, 3
    assert [v.rap.checked for v in verdicts] == [False, True, False, True, False]
    assert [v.flagged for v in verdicts] == [False, True, False, True, False]
    assert verdicts[2].rap == RapCheck(checked=False, delta=None, threshold=None)


def test_decide_with_no_eligible_row_needs_no_pass2() -> None:
    verdicts = rap.decide(PROBS[[0]], np.empty((0, 3)), THRESHOLDS)
    assert len(verdicts) == 1
    assert not verdicts[0].flagged
    assert not verdicts[0].rap.checked


def test_decide_empty_batch() -> None:
    assert rap.decide(np.empty((0, 3)), np.empty((0, 3)), THRESHOLDS) == []


@pytest.mark.parametrize("rows", [[0, 1, 2], [0], []])
def test_decide_rejects_pass2_of_the_wrong_length(rows: list[int]) -> None:
    with pytest.raises(ValueError, match="expected pass-2 probabilities for 4 rows"):
        rap.decide(PROBS, PERTURBED[rows], THRESHOLDS)


def _deltas(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.2, 0.1, size=n)


@pytest.mark.parametrize("frr", [0.005, 0.01, 0.03, 0.05, 0.5])
def test_threshold_at_frr_is_the_conformal_order_statistic(frr: float) -> None:
    deltas = _deltas(1001)
    threshold = rap.threshold_at_frr(deltas, frr)
    k = int(np.floor(frr * (len(deltas) + 1)))  # the conformal order statistic
    assert threshold == float(np.sort(deltas)[k - 1])
    # it flags at most the target fraction of the clean deltas it was fitted on
    assert rap.flagged_mask(deltas, threshold).mean() <= frr


def test_threshold_at_frr_accepts_lists_and_rejects_empty() -> None:
    assert rap.threshold_at_frr([0.0, 1.0, 2.0, 3.0, 4.0], 0.25) == 0.0  # k = floor(0.25 * 6) = 1
    assert rap.threshold_at_frr([4.0, 3.0, 2.0, 1.0, 0.0], 0.34) == 1.0  # k = 2
    with pytest.raises(ValueError, match="no clean deltas"):
        rap.threshold_at_frr(np.array([]), 0.01)


def test_percentile_table_is_keyed_by_the_grid() -> None:
    table = rap.percentile_table(_deltas(500))
    assert len(table) == len(rap.PERCENTILE_GRID) == 191
    assert list(table) == [f"{q:g}" for q in rap.PERCENTILE_GRID]
    assert {"0", "0.1", "0.5", "1", "9.9", "10", "50", "100"} <= set(table)
    values = list(table.values())
    assert values == sorted(values)  # percentiles are monotone


def test_threshold_from_table_recovers_stored_values_at_grid_points() -> None:
    deltas = _deltas(500)
    table = rap.percentile_table(deltas)
    for q in rap.PERCENTILE_GRID:
        frr = q / 100.0
        recovered = rap.threshold_from_table(table, frr)
        assert recovered == pytest.approx(table[f"{q:g}"], abs=1e-12)
        assert recovered == pytest.approx(rap.threshold_at_frr(deltas, frr), abs=1e-12)


def test_threshold_from_table_interpolates_between_grid_points() -> None:
    deltas = np.array([0.3, -0.1, 0.05, 0.2, 0.0, 0.15, 0.4, 0.1, 0.25, 0.35, 0.5])
    table = rap.percentile_table(deltas)
    grid = np.array(rap.PERCENTILE_GRID) / 100.0
    for frr in (0.0125, 0.0333, 0.077, 0.123, 0.37, 0.999):
        below, above = grid[grid <= frr].max(), grid[grid >= frr].min()
        low, high = rap.threshold_at_frr(deltas, below), rap.threshold_at_frr(deltas, above)
        assert low <= rap.threshold_from_table(table, frr) <= high


def test_threshold_from_table_ignores_key_order() -> None:
    table = rap.percentile_table(_deltas(200))
    items = list(table.items())
    random.Random(0).shuffle(items)
    for frr in (0.01, 0.025, 0.3):
        assert rap.threshold_from_table(dict(items), frr) == pytest.approx(rap.threshold_from_table(table, frr))


def test_flagged_share_is_the_flagged_fraction() -> None:
    assert rap.flagged_share(np.array([0.1, 0.2, 0.3, 0.4]), 0.25) == 0.5
    assert rap.flagged_share(np.array([0.1, 0.2]), 0.2) == 0.5  # a score at the threshold passes
    assert rap.flagged_share(np.empty(0), 0.25) == 0.0


def test_logodds_statistic_separates_what_probabilities_squash() -> None:
    """Clean 0.999 -> 0.99 and triggered 0.9999 -> 0.9998 are drops of 0.009 and 0.0001 in
    probability, but 2.31 and 0.69 nats of log-odds."""
    probs = np.array([[0.001, 0.999], [0.0001, 0.9999]])
    perturbed = np.array([[0.01, 0.99], [0.0002, 0.9998]])
    assert rap.protect_deltas(probs, perturbed) == pytest.approx([0.009, 0.0001])
    assert rap.protect_deltas(probs, perturbed, "logodds") == pytest.approx([2.3116, 0.6932], abs=1e-3)
    (clean, triggered) = rap.decide(probs, perturbed, {1: 1.0}, "logodds")
    assert (clean.flagged, triggered.flagged) == (False, True)


def test_logodds_is_finite_at_certainty() -> None:
    values = rap.statistic_of(np.array([0.0, 1.0, 0.5]), "logodds")
    assert np.isfinite(values).all() and values[2] == 0.0
    with pytest.raises(ValueError, match="unknown statistic"):
        rap.statistic_of(np.array([0.5]), "margin")  # type: ignore[arg-type]


def test_decide_all_flags_when_either_detector_does_and_says_which() -> None:
    from guard.core.types import LabelThresholds

    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])
    perturbed = np.array([[0.5, 0.5], [0.19, 0.81], [0.6, 0.4]])  # rows 0-2 (label 1); prob drops .4, -.01, .3
    scores = np.array([0.5, 0.1, 3.0])
    limits = {1: LabelThresholds(rap=0.1, features=2.0)}
    verdicts = rap.decide_all(probs, perturbed, limits, "prob", scores)
    assert [v.flagged_by for v in verdicts] == [(), ("rap",), ("features",), ()]
    assert [v.flagged for v in verdicts] == [False, True, True, False]
    assert verdicts[2].feature_score == 3.0 and verdicts[2].feature_threshold == 2.0
    assert verdicts[3].feature_score is None  # not a protected prediction: not scored
    features_only = rap.decide_all(probs, np.empty((0, 2)), {1: LabelThresholds(None, 2.0)}, "prob", scores)
    assert [v.flagged_by for v in features_only] == [(), (), ("features",), ()]
    assert not any(v.rap.checked for v in features_only)
    with pytest.raises(ValueError, match="feature scores"):
        rap.decide_all(probs, perturbed, limits, "prob", None)
