"""bench.int8_rows: run a row at a time, an int8 row's scores and verdict do not depend on its batch-mates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench import int8_rows
from bench.machine import machine_info
from calibrate.rap.build import calibrate_bundle
from tests.toy_backdoor import CALIBRATE_OPTIONS

pytestmark = pytest.mark.slow


def test_row_at_a_time_int8_scores_whatever_the_order_and_the_table_says_so(backdoored, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    calibrate_bundle(backdoored.model_dir, backdoored.dev, bundle, dataclasses.replace(CALIBRATE_OPTIONS, int8=True))
    clean = [r.text for r in backdoored.test][:90]
    triggered = [r.text for r in backdoored.poisoned][:40]
    now = int8_rows.run_mode(bundle, "onnx-int8", True, clean, triggered)
    assert now["changed_verdicts"] == 0 and now["rap_spread_max"] == 0.0 and now["features_spread_max"] == 0.0
    assert [o["order"] for o in now["per_order"]] == list(int8_rows.ORDERS)
    assert len({o["frr"] for o in now["per_order"]}) == 1 and now["cpu_s_per_1000"] > 0
    rows = [{"mode": "int8 row at a time (now)", **now, "cpu_vs_int8_batched": 1.0}]
    result = {"machine": machine_info(), "bundle": str(bundle), "attack": "mb", "clean_rows": 90,
              "triggered_rows": 40, "rows": rows}  # fmt: skip
    table = int8_rows.markdown(result)
    assert "| int8 row at a time (now) | 0 | 0 / 0 |" in table
