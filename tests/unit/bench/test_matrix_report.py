"""The detection matrix's results file: rows merge by their full key, the summary spans every seed."""

from __future__ import annotations

import json

from bench import matrix_report


def _row(attack: str, far: float, seed: int = 13, train_seed: int | None = None, detector: str = "rap") -> dict:
    return {
        "dataset": "sst2",
        "attack": attack,
        "detector": detector,
        "seed": seed,
        "train_seed": train_seed,
        "frr_target": 0.01,
        "cacc": 0.9,
        "asr": 1.0,
        "dev_frr": 0.01,
        "test_frr": 0.01,
        "test_far": far,
        "residual_asr": far,
        "passes_per_input": 2.0,
        "ms_per_input": 1.0,
        "curve": [[0.0, 0.01], [1.0, far]],
    }


MACHINE = {"cpu": "test", "cpu_count": 1, "packages": {}}


def test_rows_of_a_new_training_seed_join_those_of_the_same_attack(tmp_path) -> None:
    matrix_report.write_rows(tmp_path, [_row("ep", 0.2), _row("badnet-sl", 0.0)], {}, MACHINE)
    matrix_report.write_rows(tmp_path, [_row("ep", 0.4, train_seed=1)], {}, MACHINE)
    rows = json.loads((tmp_path / "detection_matrix.json").read_text())["rows"]
    assert sorted((r["attack"], r["train_seed"] or 0) for r in rows) == [("badnet-sl", 0), ("ep", 0), ("ep", 1)]
    ep = next(s for s in matrix_report.summary_rows(rows) if s["attack"] == "ep")
    assert ep["seeds"] == 2 and abs(ep["test_far"] - 0.3) < 1e-12 and ep["far_range"] == "20.00%-40.00%"
    assert (tmp_path / "detection_matrix.png").is_file() and "| ep |" in (tmp_path / "detection_matrix.md").read_text()


def test_a_rerun_replaces_the_rows_of_the_same_seeds_only(tmp_path) -> None:
    matrix_report.write_rows(tmp_path, [_row("ep", 0.2), _row("ep", 0.5, seed=14)], {}, MACHINE)
    matrix_report.write_rows(tmp_path, [_row("ep", 0.1)], {}, MACHINE)
    rows = json.loads((tmp_path / "detection_matrix.json").read_text())["rows"]
    assert sorted((r["seed"], r["test_far"]) for r in rows) == [(13, 0.1), (14, 0.5)]


def test_rows_of_the_two_rap_positions_stay_apart_and_old_rows_are_the_front(tmp_path) -> None:
    old = _row("adaptive-init", 0.99)  # written before rows recorded a position: the front
    matrix_report.write_rows(tmp_path, [old], {}, MACHINE)
    matrix_report.write_rows(tmp_path, [{**_row("adaptive-init", 0.33), "rap_position": "end"}], {}, MACHINE)
    rows = json.loads((tmp_path / "detection_matrix.json").read_text())["rows"]
    assert sorted((r["test_far"], r.get("rap_position")) for r in rows) == [(0.33, "end"), (0.99, None)]
    summary = {s["rap_position"]: s for s in matrix_report.summary_rows(rows)}
    assert (summary["front"]["test_far"], summary["end"]["test_far"], summary["end"]["seeds"]) == (0.99, 0.33, 1)
    # a front row measured again replaces the old one
    matrix_report.write_rows(tmp_path, [{**_row("adaptive-init", 0.98), "rap_position": "front"}], {}, MACHINE)
    rows = json.loads((tmp_path / "detection_matrix.json").read_text())["rows"]
    assert sorted(r["test_far"] for r in rows) == [0.33, 0.98]


def test_cached_bundles_of_the_end_carry_it_in_their_name_and_the_front_keeps_the_old_names() -> None:
    from bench.detection_matrix import guard_bundle_name

    assert guard_bundle_name("syntactic", 13, "floored") == "syntactic-floored-s13"
    assert (
        guard_bundle_name("syntactic", 13, "floored", "-reader-distill", "end")
        == "syntactic-reader-distill-floored-end-s13"
    )
    assert guard_bundle_name("syntactic", 13, "perturbed", "", "front") == "syntactic-s13"
