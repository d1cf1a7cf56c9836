"""The one flag rule (guard.core.detection) and the thresholds it reads, with hand-made scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guard.core import detection, thresholds
from guard.core.detection import RowScores
from guard.core.types import LabelThresholds

NAN = np.nan
# five rows, three texts (text 1 has two windows, text 2 two); labels from the probabilities
PROBS = np.array([[0.25, 0.75], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75], [0.25, 0.75]])
OWNER = np.array([0, 1, 1, 2, 2])


def _scores(rap, features=(NAN,) * 5, token=(False,) * 5, switch=(NAN,) * 5) -> RowScores:
    n = len(rap)
    return RowScores(
        PROBS, OWNER, np.array(rap, float), np.array(features, float), np.array(token), np.full(n, np.nan),
        np.array(switch, float),
    )  # fmt: skip


def test_the_switch_detector_flags_a_fall_above_its_threshold_and_names_itself() -> None:
    scores = _scores([-1.0] * 5, switch=[5.0, 9.0, 0.5, NAN, 2.5])
    limits = {1: LabelThresholds(0.0, switch=2.0)}
    assert detection.flags(scores, limits)["switch"].tolist() == [True, False, False, False, True]  # row 1: label 0
    assert detection.flagged_texts(scores, limits).tolist() == [True, False, True]
    assert [v.flagged_by for v in detection.verdicts(scores, limits)] == [("switch",), (), ("switch",)]
    assert not detection.flags(scores, {1: LabelThresholds(0.0)})["switch"].any()  # off: never flags


def test_each_detector_flags_above_its_threshold_and_never_an_unscored_or_unprotected_row() -> None:
    scores = _scores([0.5, 9.0, 0.1, NAN, 0.0], [1.0, 9.0, 3.0, NAN, 2.0], [False, True, False, True, False])
    flags = detection.flags(scores, {1: LabelThresholds(0.1, 2.0)})
    assert flags["rap"].tolist() == [True, False, False, False, False]  # 0.1 at the threshold passes
    assert flags["features"].tolist() == [False, False, True, False, False]
    assert flags["token"].tolist() == [False, False, False, True, False]  # row 1 is label 0: unprotected
    rap_only = detection.flags(scores, {1: LabelThresholds(0.1, None)})
    assert not rap_only["features"].any() and not rap_only["token"].any()  # the blocklist comes with features


def test_a_text_is_flagged_when_any_window_is_and_says_by_what() -> None:
    scores = _scores([-1.0, NAN, -1.0, -1.0, 1.0], [0.0, NAN, 0.0, 0.0, 0.0], [False, False, True, False, False])
    limits = {1: LabelThresholds(0.0, 5.0)}
    assert detection.flagged_texts(scores, limits).tolist() == [False, True, True]
    clean, token, rap_hit = detection.verdicts(scores, limits)
    assert (clean.flagged, clean.flagged_by, clean.rap.score, clean.rap.threshold) == (False, (), -1.0, 0.0)
    assert token.label == 0 and token.flagged_by == ("token",)  # label: the first window's
    assert rap_hit.flagged_by == ("rap",) and rap_hit.rap.score == 1.0  # the flagged window's score is shown
    assert rap_hit.feature_score == 0.0 and rap_hit.feature_threshold == 5.0


def test_rows_concatenate_with_their_texts_renumbered() -> None:
    one = _scores([0.0] * 5)
    both = RowScores.concat([one, one])
    assert both.owner.tolist() == [0, 1, 1, 2, 2, 3, 4, 4, 5, 5] and both.texts == 6


def test_fit_label_stores_the_conformal_thresholds_flagging_above() -> None:
    rap_scores = np.linspace(-1.0, 0.0, 101)
    features = np.linspace(0.0, 10.0, 101)
    blocked = np.zeros(101, bool)
    blocked[0] = True  # a held-out row with a blocklisted token counts against the target
    label = detection.fit_label(1, "positive", (0.01, 0.05), rap_scores, features, blocked)
    # k = floor(0.05 * 102) = 5: the 5th largest score
    assert label.thresholds == {"0.01": 0.0, "0.05": pytest.approx(-0.04)}
    assert label.features_thresholds["0.05"] == pytest.approx(9.7)  # +inf (blocked), 10, 9.9, 9.8, 9.7
    for frr in (0.01, 0.05):
        pair = label.joint[f"{frr:g}"]
        union = (rap_scores > pair.rap) | (features > pair.features) | blocked
        assert union.sum() <= thresholds.rank_at(frr, 101)


def test_fit_label_with_a_switch_fits_it_alone_and_with_every_detector_together() -> None:
    rng = np.random.default_rng(3)
    rap_scores, features, switch = rng.normal(size=(3, 300))
    label = detection.fit_label(1, "positive", (0.01, 0.03), rap_scores, features, None, reader_scores=switch,
                                switch_scores=switch)  # fmt: skip
    assert (label.label, label.name) == (1, "positive")  # a detector's name never replaces the label's
    assert label.switch_thresholds["0.03"] == pytest.approx(thresholds.threshold_at_frr(switch, 0.03))
    assert label.reader_thresholds == label.switch_thresholds  # the same scores given to both
    for frr in (0.01, 0.03):
        together = label.joint_reader[f"{frr:g}"]
        assert together.reader is not None and together.switch is not None
        union = (rap_scores >= together.rap) | (features >= together.features) | (switch >= together.switch)
        union |= switch >= together.reader
        assert union.sum() <= thresholds.rank_at(frr, 300)


def test_percentile_table_recovers_the_threshold_at_each_grid_frr() -> None:
    scores = np.random.default_rng(0).normal(size=500)
    table = thresholds.percentile_table(scores)
    assert list(table) == [f"{q:g}" for q in thresholds.PERCENTILE_GRID]
    values = list(table.values())
    assert values == sorted(values, reverse=True)  # a larger FRR: a lower threshold
    for frr in (0.003, 0.01, 0.2):
        assert thresholds.threshold_from_table(table, frr) == pytest.approx(thresholds.threshold_at_frr(scores, frr))


def test_a_floored_bundle_without_a_labels_floor_is_refused(tmp_path) -> None:
    """The floored statistic reads each protected label's floor; a bundle without one is refused at load,
    never scored with a made-up floor."""
    from guard.core.bundle import load_bundle, save_bundle
    from guard.core.detection import Detection
    from guard.core.errors import BundleError
    from tests.server_fixtures import build_stub_bundle, manifest

    path = build_stub_bundle(tmp_path / "bundle")
    recorded = manifest()
    save_bundle(path, recorded.model_copy(update={"statistic": "floored"}))
    with pytest.raises(BundleError, match="floor"):
        Detection.of(load_bundle(path))
    (label,) = recorded.protect
    nan_floor = recorded.model_copy(
        update={"statistic": "floored", "protect": [label.model_copy(update={"floor": math.nan})]}
    )
    save_bundle(path, nan_floor)  # NaN would make every RAP score NaN: never flagged
    with pytest.raises(BundleError, match="floor"):
        Detection.of(load_bundle(path))
    save_bundle(
        path, recorded.model_copy(update={"statistic": "floored", "protect": [label.model_copy(update={"floor": 1.5})]})
    )
    assert Detection.of(load_bundle(path)).floors == {1: 1.5}
