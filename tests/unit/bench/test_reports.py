"""The report writers make of the committed JSON exactly the committed markdown: a refactor of a
benchmark (or of its report) that changes what it writes shows here, without rerunning it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import robustness, serving_report
from bench.robustness_cases import Case

RESULTS = Path(__file__).parents[3] / "bench" / "results"


def _committed(name: str) -> tuple[dict, str]:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8")), (RESULTS / f"{name}.md").read_text(
        encoding="utf-8"
    )


def test_robustness_md_is_regenerated_from_its_json() -> None:
    record, md = _committed("robustness")
    assert robustness.markdown([Case(**c) for c in record["cases"]], record["bundle"]) == md


# serving.md was written before the RAP-alone ratio columns existed (its run had no guarded-lazy-rap
# server): today's writer adds them empty, so only the later run is compared byte for byte.
@pytest.mark.parametrize("name", ["serving_detectors", "serving_reader"])
def test_serving_md_is_regenerated_from_its_json(name: str) -> None:
    result, md = _committed(name)
    settings = result["settings"]
    args = argparse.Namespace(**{k: settings[k] for k in ("rounds", "seconds", "warmup", "threads")})
    assert serving_report.markdown(result, args) == md


@pytest.mark.parametrize("name", ["serving_detectors", "serving_reader"])
def test_serving_targets_are_recomputed_from_the_rows(name: str) -> None:
    result, _ = _committed(name)
    assert serving_report.ratios(result["rows"]) == result["ratios"]
    assert serving_report.targets(result["rows"], result["ratios"], result["graphs"]) == result["targets"]
