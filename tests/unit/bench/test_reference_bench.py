"""bench.reference_disagreement's report: one row per (dataset, attack, reader), each variant's FRR / FAR."""

from __future__ import annotations

from bench.reference_disagreement import VARIANTS, markdown, table_rows


def _result(attack: str, far: float) -> dict:
    points = [
        {"variant": v, "frr_target": frr, "test_frr": frr, "test_far": far if "reference" in v else 1.0}
        for v in VARIANTS
        for frr in (0.01, 0.03)
    ]
    return {"dataset": "sst2", "attack": attack, "reference": "calibration", "reference_accuracy": 0.84,
            "auroc": {"reference": 0.8, "reference-diff": 0.9}, "points": points}  # fmt: skip


def test_rows_read_each_variant_at_the_asked_target() -> None:
    rows = table_rows([_result("style", 0.25), _result("syntactic", 0.5)], 0.03)
    assert [r["attack"] for r in rows] == ["style", "syntactic"]
    assert rows[0]["floored+features"] == "3.0% / 100.0%"
    assert rows[0]["floored+features+reference-diff"] == "3.0% / 25.0%"
    assert rows[1]["reference"] == "3.0% / 50.0%" and rows[1]["AUROC ref / diff"] == "0.80 / 0.90"


def test_markdown_has_a_table_per_target_and_the_machine() -> None:
    text = markdown([_result("style", 0.25)], {"cpu": "test cpu", "cpu_count": 2, "packages": {"torch": "x"}})
    assert "## At 1% target FRR" in text and "## At 3% target FRR" in text
    assert text.count("| sst2 | style | calibration |") == 2 and "test cpu x2; torch x" in text
