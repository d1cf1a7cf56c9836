"""The RAP statistic (guard.core.rap) with hand-made probabilities.

Probabilities are dyadic fractions (0.125, 0.25, ...) so scores are exact in
binary floating point and the expected values can be written down.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from guard.core import rap


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


def test_scores_are_taken_on_each_rows_pass1_label_and_higher_is_more_suspicious() -> None:
    probs = np.array([[0.25, 0.75], [0.875, 0.125]])
    perturbed = np.array([[0.5, 0.5], [0.9375, 0.0625]])
    # row 0: label 1, 0.5 - 0.75 (pushed away: clean-like); row 1: label 0, 0.9375 - 0.875 (raised)
    assert rap.scores(probs, perturbed, "prob").tolist() == [-0.25, 0.0625]
    # perturbed: logit p(y|x+RAP): log(0.5 / 0.5) = 0, log(0.9375 / 0.0625) = log 15
    assert rap.scores(probs, perturbed, "perturbed") == pytest.approx([0.0, math.log(15)])
    assert rap.DEFAULT_STATISTIC == "floored"


def test_floored_is_the_drop_above_the_floor_and_the_perturbed_log_odds_below_it() -> None:
    """Label 1's floor is log 3 (p = 0.75). A confident row (p 0.9375 = logit log 15) that barely moves
    (-> 0.875, log 7) scores minus its drop, log 7 - log 15; a clean-like one (-> 0.5) minus its larger drop.
    An unsure row (p 0.625, below the floor) pushed UP to 0.75 scores 0 (log 3 - log 3): it is measured from
    the floor. Under `logodds` it would score +0.59, above both confident rows."""
    probs = np.array([[0.0625, 0.9375], [0.0625, 0.9375], [0.375, 0.625]])
    perturbed = np.array([[0.125, 0.875], [0.5, 0.5], [0.25, 0.75]])
    floors = {1: math.log(3)}
    got = rap.scores(probs, perturbed, "floored", floors)
    assert got == pytest.approx([math.log(7) - math.log(15), 0.0 - math.log(15), 0.0])
    assert got[0] > got[1]  # the row that barely moved is the more suspicious
    drops = rap.scores(probs, perturbed, "logodds")
    assert drops[2] == pytest.approx(math.log(3) - math.log(5 / 3)) and drops[2] > drops[0]  # the drop's failure


def test_floored_needs_every_predicted_labels_floor() -> None:
    probs, perturbed = np.array([[0.25, 0.75]]), np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"floor for label\(s\) \[1\]"):
        rap.scores(probs, perturbed, "floored", {0: 1.0})
    with pytest.raises(ValueError, match="floor"):
        rap.scores(probs, perturbed, "floored")


def test_floor_is_the_low_quantile_of_the_clean_rows_log_odds() -> None:
    p = 1.0 / (1.0 + np.exp(-np.arange(1.0, 11.0)))  # log-odds 1, 2, ..., 10
    assert rap.floor(p) == pytest.approx(np.quantile(np.arange(1.0, 11.0), rap.FLOOR_QUANTILE), abs=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        rap.floor(np.array([]))


def test_logodds_statistic_separates_what_probabilities_squash() -> None:
    """Clean 0.999 -> 0.99 and triggered 0.9999 -> 0.9998 are drops of 0.009 and 0.0001 in
    probability, but 2.31 and 0.69 nats of log-odds."""
    probs = np.array([[0.001, 0.999], [0.0001, 0.9999]])
    perturbed = np.array([[0.01, 0.99], [0.0002, 0.9998]])
    assert rap.scores(probs, perturbed, "prob") == pytest.approx([-0.009, -0.0001])
    assert rap.scores(probs, perturbed, "logodds") == pytest.approx([-2.3116, -0.6932], abs=1e-3)


def test_logodds_is_finite_at_certainty() -> None:
    values = rap.log_odds(np.array([0.0, 1.0, 0.5]))
    assert np.isfinite(values).all() and values[2] == 0.0
    with pytest.raises(ValueError, match="unknown statistic"):
        rap.scores(np.array([[0.5, 0.5]]), np.array([[0.5, 0.5]]), "margin")  # type: ignore[arg-type]


def test_every_statistic_has_the_formula_its_plots_show() -> None:
    assert set(rap.FORMULAS) == set(rap.STATISTICS)
