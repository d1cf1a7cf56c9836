"""Conformal thresholds, their FRR bound, and the joint rule of two detectors (guard.core.thresholds)."""

from __future__ import annotations

import numpy as np
import pytest

from guard.core import thresholds


def test_the_conformal_threshold_keeps_the_frr_on_new_rows_at_most_the_target() -> None:
    """Averaged over many held-out sets of 230 rows, new clean rows are flagged at <= the target rate."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(2000):
        t = -thresholds.threshold_at_frr(-rng.normal(size=230), 0.01)
        rates.append(np.mean(rng.normal(size=200) < t))
    assert np.mean(rates) <= 0.01 + 0.001
    assert np.mean(rates) == pytest.approx(thresholds.expected_frr(0.01, 230), abs=0.0015)


def test_the_upper_bound_holds_with_its_confidence() -> None:
    rng = np.random.default_rng(1)
    n, frr, confidence = 230, 0.01, 0.9
    bound = thresholds.frr_upper_bound(frr, n, confidence)
    assert frr < bound < 0.05
    # the true FRR of each threshold is the normal CDF at it: count how often it stays under the bound
    from math import erf, sqrt

    true_frr = [0.5 * (1 + erf(-thresholds.threshold_at_frr(-rng.normal(size=n), frr) / sqrt(2))) for _ in range(3000)]
    assert np.mean(np.array(true_frr) <= bound) == pytest.approx(confidence, abs=0.03)


def test_more_rows_tighten_the_bound() -> None:
    assert thresholds.frr_upper_bound(0.01, 2000) < thresholds.frr_upper_bound(0.01, 230)
    n = thresholds.rows_needed(0.01, slack=1.5)
    assert all(thresholds.frr_upper_bound(0.01, m) <= 0.015 for m in range(n, 3 * n, 7))
    assert any(thresholds.frr_upper_bound(0.01, m) > 0.015 for m in range(n // 2, n))


def test_too_few_rows_give_the_largest_value_and_a_bound_above_the_target() -> None:
    values = np.array([3.0, 1.0, 2.0])
    assert thresholds.threshold_at_frr(-values, 0.01) == -1.0
    assert thresholds.expected_frr(0.01, 3) == 0.25
    with pytest.raises(ValueError, match="no clean scores"):
        thresholds.threshold_at_frr(np.empty(0), 0.01)


def test_joint_thresholds_flag_the_target_share_together() -> None:
    rng = np.random.default_rng(2)
    n = 999
    deltas, scores = rng.normal(size=n), rng.normal(size=n)
    pair = thresholds.joint(-deltas, scores, 0.02)
    # every row at or beyond either threshold counts: each detector's boundary row is a flag's worth
    at_or_beyond = np.count_nonzero((-deltas >= pair.rap) | (scores >= pair.features))
    k = thresholds.rank_at(0.02, n)  # 20
    assert at_or_beyond <= k
    # each alone is at a per-detector FRR between half the target and the target (independent scores)
    assert 0.009 <= pair.features_frr <= pair.rap_frr <= 0.02
    assert np.count_nonzero(-deltas > pair.rap) == round(pair.rap_frr * (n + 1)) - 1  # its rank-th row sits AT it
    # identical scores: the union is one detector, so each gets the whole target
    same = thresholds.joint(-deltas, -deltas, 0.02)
    assert same.rap_frr == same.features_frr == pytest.approx(k / (n + 1))


def test_each_detector_counts_its_own_boundary_row() -> None:
    # 220 held-out rows, a 1% target: k = 2. Each detector's threshold sits AT one row, so the two
    # boundary rows already spend the budget: neither flags a held-out row, expected FRR 2 / 221.
    rng = np.random.default_rng(4)
    deltas, scores = rng.normal(size=220), rng.normal(size=220)
    pair = thresholds.joint(-deltas, scores, 0.01)
    assert np.count_nonzero(-deltas > pair.rap) == np.count_nonzero(scores > pair.features) == 0
    assert pair.rap_frr == pytest.approx(1 / 221) and pair.features_frr == pytest.approx(1 / 221)


def test_the_budget_a_shared_rank_leaves_goes_to_rap_then_to_the_features() -> None:
    # 550 rows, a 1% target: k = 5. Sharing gives rank 2 each (four rows at or beyond); the fifth
    # row of the budget goes to RAP. An exhaustive search finds no pair that spends more of it.
    rng = np.random.default_rng(4)
    deltas, scores = rng.normal(size=550), rng.normal(size=550)
    pair = thresholds.joint(-deltas, scores, 0.01)
    low, high = np.sort(deltas), np.sort(scores)[::-1]

    def spent(a: int, b: int) -> int:
        return int(np.count_nonzero((deltas <= low[a - 1]) | (scores >= high[b - 1])))

    ranks = (round(pair.rap_frr * 551), round(pair.features_frr * 551))
    assert ranks == (3, 2)
    assert spent(*ranks) == max(spent(a, b) for a in range(1, 7) for b in range(1, 7) if spent(a, b) <= 5)

    with pytest.raises(ValueError, match="one score per held-out row from every detector"):
        thresholds.joint(-deltas, scores[:-1], 0.02)


def test_three_detectors_together_spend_the_target_and_none_can_take_one_more_rank() -> None:
    rng = np.random.default_rng(6)
    scores = [rng.normal(size=700) for _ in range(3)]
    chosen, own = thresholds.union(scores, 0.01)  # k = 7
    flagged = np.logical_or.reduce([s >= t for s, t in zip(scores, chosen, strict=True)])
    assert 0 < np.count_nonzero(flagged) <= 7
    ranks = [round(f * 701) for f in own]
    for i, s in enumerate(scores):  # one rank more for any detector breaks the budget
        if ranks[i] < 7:
            more = np.sort(s)[::-1][ranks[i]]
            wider = [*chosen[:i], more, *chosen[i + 1 :]]
            assert np.count_nonzero(np.logical_or.reduce([x >= t for x, t in zip(scores, wider, strict=True)])) > 7
    pair = thresholds.joint(scores[0], scores[1], 0.01)
    assert thresholds.union(scores[:2], 0.01)[0] == [pair.rap, pair.features]


def test_rows_with_a_suspicious_token_count_against_the_target_and_thresholds_stay_finite() -> None:
    rng = np.random.default_rng(5)
    deltas, scores = rng.normal(size=550), rng.normal(size=550)
    scores[:3] = np.inf  # three held-out rows hold a flagged token: flagged whatever the thresholds
    pair = thresholds.joint(-deltas, scores, 0.01)  # k = 5
    assert np.isfinite(pair.features) and np.isfinite(pair.rap)
    assert np.count_nonzero((-deltas >= pair.rap) | (scores >= pair.features)) <= 5
    assert np.count_nonzero(scores > pair.features) >= 3
    # more such rows than the target allows: the thresholds flag nothing else, and stay finite
    scores[:9] = np.inf
    crowded = thresholds.joint(-deltas, scores, 0.01)
    assert np.isfinite(crowded.features) and np.count_nonzero(-deltas > crowded.rap) == 0
    assert crowded.features == np.max(scores[np.isfinite(scores)])


def test_too_few_rows_for_several_detectors_say_what_the_union_may_reach() -> None:
    """140 rows at 1%: k = 1, so three detectors, each beyond its own maximum, may flag 3 / 141 of new clean
    rows; 299 rows (k = 3) afford them. Measured, not assumed: three independent detectors at rank 1."""
    assert thresholds.detectors_affordable(0.01, 299, 3) is None
    reach, rows = thresholds.detectors_affordable(0.01, 140, 3)
    assert reach == pytest.approx(3 / 141) and rows == 299
    assert thresholds.detectors_affordable(0.01, 140, 1) is None  # one detector: the conformal target's own bound
    rng = np.random.default_rng(2)
    flagged = []
    for _ in range(2000):
        held, new = rng.normal(size=(140, 3)), rng.normal(size=(1, 3))
        chosen, _ = thresholds.union(list(held.T), 0.01)
        flagged.append(bool(np.any(new[0] > np.array(chosen))))
    assert abs(np.mean(flagged) - reach) < 0.01
