"""bench.serving_families: the committed markdown is made of the committed JSON, and its ratios of its rows."""

from __future__ import annotations

import json
from pathlib import Path

from bench import serving_families

RESULTS = Path(__file__).parents[3] / "bench" / "results"


def _committed() -> tuple[dict, str]:
    result = json.loads((RESULTS / "serving_families.json").read_text(encoding="utf-8"))
    return result, (RESULTS / "serving_families.md").read_text(encoding="utf-8")


def test_serving_families_md_is_regenerated_from_its_json() -> None:
    result, md = _committed()
    assert serving_families.markdown(result) == md


def test_serving_families_ratios_are_recomputed_from_the_rows() -> None:
    result, _ = _committed()
    assert serving_families.family_ratios(result["rows"], result["rounds"]) == result["ratios"]
    assert {r["family"] for r in result["ratios"]} == set(result["settings"]["families"])
