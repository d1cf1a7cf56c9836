"""bench.adaptive's arithmetic: unions of flag-above scores, the two-sided split, the per-model band."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import adaptive


def test_two_sided_union_splits_the_target_over_both_tails() -> None:
    held = np.arange(1000, dtype=float)
    scores = {"s": held, "-s": -held}
    point = adaptive.union_points(scores, scores, scores, ("s", "-s"), 0.02)
    # each tail at 1%: the 10th largest of 1,000 (conformal: floor(0.01 x 1001)), flagged strictly above it
    assert point["thresholds"] == {"s": 990.0, "-s": -9.0}
    assert point["held_frr"] == pytest.approx(0.018)


def test_a_two_sided_test_catches_what_moves_too_much_and_a_one_sided_one_does_not() -> None:
    rng = np.random.default_rng(0)
    clean, held = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    moved = rng.normal(-6, 0.5, 300)  # triggered rows pushed far DOWN (the adaptive backdoor switching off)
    pack = lambda x: {"s": x, "-s": -x}  # noqa: E731
    one = adaptive.union_points(pack(held), pack(clean), pack(moved), ("s",), 0.01)
    two = adaptive.union_points(pack(held), pack(clean), pack(moved), ("s", "-s"), 0.01)
    assert one["test_far"] == 1.0
    assert two["test_far"] < 0.01 and two["test_frr"] < 0.02


def test_band_follows_the_models_confidence() -> None:
    assert adaptive.band_for(np.linspace(2.0, 12.0, 101)) == (1.5, 3.0)
    assert adaptive.band_for(np.full(10, -1.0)) == (0.1, 0.2)  # never a band at or below 0


def test_auroc() -> None:
    assert adaptive.auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert adaptive.auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert adaptive.auc(np.array([1.0]), np.array([1.0])) == 0.5


def test_side_by_side_ratio() -> None:
    point = lambda far: {"test_frr": 0.01, "test_far": far}  # noqa: E731
    assert adaptive._ratio(point(0.5), point(1.0)) == 2.0
    assert adaptive._ratio(point(0.0), point(0.3)) == "inf"
    assert adaptive._ratio(point(0.0), point(0.0)) is None
    assert adaptive._ratio(None, point(0.3)) is None


def test_merge_results_replaces_rows_with_the_same_key_and_keeps_the_rest(tmp_path) -> None:
    path = tmp_path / "r.json"
    adaptive.merge_results(path, "sst2", [{"attack": "a", "v": 1}, {"attack": "b", "v": 1}], ("dataset", "attack"))
    adaptive.merge_results(path, "olid", [{"attack": "a", "v": 2}], ("dataset", "attack"))
    rows, machine = adaptive.merge_results(path, "sst2", [{"attack": "a", "v": 3}], ("dataset", "attack"))
    kept = sorted((r["dataset"], r["attack"], r["v"]) for r in rows)
    assert kept == [("olid", "a", 2), ("sst2", "a", 3), ("sst2", "b", 1)]
    assert "cpu" in machine and json.loads(path.read_text())["results"] == rows
