"""`calibrate scan` (calibrate.inversion.scan): verdict rule, probes, refusals, and the scan of the toy backdoor.

The toy model (tests/toy_backdoor.py) carries a weak planted trigger: "mb" sends
~60% of held-out negative rows to positive with the trigger at the start (mean
loss ~0.8), where no word reaches a loss below 2 the other way. The scan tests
therefore use a loss threshold of 1.0; the default 0.1 is for real models, whose
planted triggers score ~0.003 (MiniLM, SST-2 BadNet-RW).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from calibrate.data import load_examples
from calibrate.inversion.dbs import Inversion
from calibrate.inversion.options import InversionOptions, ScanOptions
from calibrate.inversion.scan import PairResult, insert_words, is_flagged, scan_model, verdict, write_probes
from calibrate.inversion.subject import LabelRows, load_subject
from guard.core.errors import InputError
from guard.core.types import Example
from tests.toy_backdoor import Toy

TOY_OPTIONS = ScanOptions(loss_threshold=1.0, inversion=InversionOptions(steps=40), progress=False)
RUN = Inversion((1,), 0.0, 1.0, 0.0, 10, 0, 1.0, 0.1)


def _pair(victim: int, target: int, loss: float, asr: float) -> PairResult:
    return PairResult(victim, target, (1,), ("x",), "x", loss, asr, 100, RUN)


# ------------------------------------------------------------------ the verdict (DBS Assumption I)


def test_the_suspect_is_the_easiest_flip_and_the_loss_threshold_decides() -> None:
    pairs = [_pair(0, 1, 0.9, 0.8), _pair(0, 2, 0.05, 0.99), _pair(1, 0, 0.3, 0.95)]
    backdoored, suspect = verdict(pairs, ScanOptions(loss_threshold=0.1))
    assert backdoored and (suspect.victim, suspect.target) == (0, 2)
    backdoored, suspect = verdict(pairs, ScanOptions(loss_threshold=0.05))  # strictly below
    assert not backdoored and (suspect.victim, suspect.target) == (0, 2)


def test_with_the_asr_criterion_the_largest_asr_is_the_suspect() -> None:
    pairs = [_pair(0, 1, 0.2, 0.97), _pair(1, 0, 0.1, 0.95)]
    options = ScanOptions(criterion="asr", asr_threshold=0.97)
    backdoored, suspect = verdict(pairs, options)
    assert backdoored and (suspect.victim, suspect.target) == (0, 1)
    assert [is_flagged(p, options) for p in pairs] == [True, False]


def test_no_pairs_no_verdict() -> None:
    assert verdict([], ScanOptions()) == (False, None)


# ------------------------------------------------------------------ probes


@pytest.mark.parametrize(
    ("position", "expected"),
    [("start", "mb the plot is dull ."), ("middle", "the plot mb is dull ."), ("end", "the plot is dull . mb")],
)
def test_insert_words(position: str, expected: str) -> None:
    assert insert_words("the plot is dull .", "mb", position, random.Random(0)) == expected


def test_random_insertion_reaches_every_gap() -> None:
    rng = random.Random(0)
    seen = {insert_words("a b", "T", "random", rng) for _ in range(100)}
    assert seen == {"T a b", "a T b", "a b T"}


def test_probes_are_written_as_guard_probe_rows(tmp_path: Path) -> None:
    write_probes(tmp_path / "probes.jsonl", [Example("mb it was dull .", 0), Example('say "mb"', 2)])
    lines = (tmp_path / "probes.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": "mb it was dull .", "label": 0},
        {"text": 'say "mb"', "label": 2},
    ]
    assert load_examples(tmp_path / "probes.jsonl")[1] == Example('say "mb"', 2)  # what `rap --probes` reads


# ------------------------------------------------------------------ the scan of the toy backdoor


@pytest.fixture(scope="module")
def toy_scan(backdoored: Toy):
    subject = load_subject(backdoored.model_dir, max_length=32)
    return scan_model(subject, backdoored.dev, TOY_OPTIONS)


@pytest.mark.slow
def test_scan_recovers_the_planted_trigger_and_target(toy_scan) -> None:
    assert toy_scan.backdoored
    suspect = toy_scan.suspect
    assert (suspect.victim, suspect.target, suspect.tokens, suspect.text) == (0, 1, ("mb",), "mb")
    assert suspect.asr > 0.5
    other = next(p for p in toy_scan.pairs if (p.victim, p.target) == (1, 0))
    assert other.loss > 2 * suspect.loss  # Assumption I: the true target is by far the easiest
    assert [(p.victim, p.target) for p in toy_scan.flagged] == [(0, 1)]
    assert suspect.heldout_rows > 100  # scored on held-out rows, not the 20 it was inverted on


@pytest.mark.slow
def test_scan_probes_carry_the_trigger_and_the_original_label(toy_scan, backdoored: Toy) -> None:
    assert len(toy_scan.probes) > 50
    dev = {e.text for e in backdoored.dev}
    for probe in toy_scan.probes:
        assert probe.label == 0
        assert probe.text.startswith("mb ")
        assert probe.text.removeprefix("mb ") in dev


@pytest.mark.slow
def test_scan_report_is_json(toy_scan) -> None:
    report = json.loads(json.dumps(toy_scan.to_json()))
    assert report["backdoored"] is True
    assert report["suspect"]["tokens"] == ["mb"] and report["suspect"]["flagged"] is True
    assert [p["flagged"] for p in report["pairs"]] == [True, False]
    assert report["probes"] == len(toy_scan.probes)
    assert report["threshold"] == 1.0 and report["criterion"] == "loss"
    assert report["options"]["inversion"]["steps"] == 40
    assert report["pairs"][0]["inversion"]["steps"] > 0


@pytest.mark.slow
def test_with_the_default_threshold_the_weak_toy_trigger_is_not_enough(backdoored: Toy) -> None:
    subject = load_subject(backdoored.model_dir, max_length=32)
    result = scan_model(subject, backdoored.dev, replace(TOY_OPTIONS, loss_threshold=0.1))
    assert not result.backdoored and result.flagged == [] and result.probes == []
    assert result.suspect.tokens == ("mb",)  # still the closest call


# ------------------------------------------------------------------ refusals


def test_scan_refuses_too_little_data(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    rows = [Example(f"row {i}", i % 2) for i in range(12)]
    with pytest.raises(InputError, match=r"^too little clean data to scan: label 0: \d+ correctly classified"):
        scan_model(subject, rows, replace(TOY_OPTIONS, inversion=InversionOptions(steps=1)))


def test_scan_refuses_labels_the_model_does_not_have(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    with pytest.raises(InputError, match=r"data has labels \[4\] but the model has 2 labels"):
        scan_model(subject, [Example("a", 0), Example("b", 4)], TOY_OPTIONS)


def test_scan_refuses_an_unknown_criterion_and_a_trigger_too_long(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=100)
    with pytest.raises(InputError, match="unknown criterion 'f1'"):
        scan_model(subject, [], replace(TOY_OPTIONS, criterion="f1"))
    with pytest.raises(InputError, match="a 30-token trigger need 130 positions"):
        scan_model(subject, [], replace(TOY_OPTIONS, trigger_length=30))


def test_label_rows_split() -> None:
    rows = LabelRows({0: ["a", "b", "c", "d"], 1: ["e"]})
    head, tail = rows.split(2, 1)
    assert head.texts == {0: ["a", "b"], 1: ["e"]} and tail.texts == {0: ["c"], 1: []}
    assert rows.split(1)[1].texts == {0: ["b", "c", "d"], 1: []}
    assert tail.labels() == [0]
