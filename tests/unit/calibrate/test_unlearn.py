"""`calibrate unlearn` (calibrate.unlearn) on the toy backdoored model, and the triggers it takes.

The toy model was trained at lr 1e-3 from random weights; unlearning it needs the
same rate (the default, 1e-4, suits pre-trained encoders and barely moves it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibrate.inversion import InversionOptions, load_subject
from calibrate.repair import read_record
from calibrate.scan import ScanOptions, scan_model
from calibrate.unlearn import (
    Trigger,
    UnlearnOptions,
    save_model,
    trigger_asr,
    triggers_from_scan,
    unlearn_model,
)
from guard.core.errors import InputError
from guard.core.types import Example
from tests.toy_backdoor import Toy

TOY_UNLEARN = UnlearnOptions(epochs=2, learning_rate=1e-3, progress=False)
MB = Trigger((16914,), 1, "mb")


@pytest.fixture()
def toy_subject(backdoored: Toy):
    """A fresh copy of the toy model per test: unlearning changes it in place."""
    return load_subject(backdoored.model_dir, max_length=32)


@pytest.mark.slow
def test_unlearning_the_planted_trigger_drops_its_asr(toy_subject, backdoored: Toy) -> None:
    result = unlearn_model(toy_subject, backdoored.dev, [MB], TOY_UNLEARN)
    assert result.asr_before[0] > 0.8
    assert result.asr_after[0] < 0.1
    assert result.cacc_after >= result.cacc_before - 0.02
    assert result.eval_rows == 60 and result.train_rows == 240  # holdout_fraction 0.2 of 300 rows
    assert result.stamped_rows == 48  # stamp_fraction 0.2 of the 240 fine-tuning rows
    # the ASR is measured on held-out rows, but the whole test set agrees
    assert trigger_asr(toy_subject, backdoored.test, MB, "random", seed=0) < 0.1


@pytest.mark.slow
def test_the_trigger_a_scan_found_can_be_unlearned(toy_subject, backdoored: Toy, tmp_path: Path) -> None:
    options = ScanOptions(loss_threshold=1.0, inversion=InversionOptions(steps=40), progress=False)
    scan = scan_model(toy_subject, backdoored.dev, options)
    (tmp_path / "scan.json").write_text(json.dumps(scan.to_json()))
    triggers = triggers_from_scan(tmp_path / "scan.json")
    assert triggers == [MB]
    result = unlearn_model(toy_subject, backdoored.dev, triggers, TOY_UNLEARN)
    assert result.asr_after[0] < 0.1


@pytest.mark.slow
def test_the_repaired_model_is_saved_with_its_record(toy_subject, backdoored: Toy, tmp_path: Path) -> None:
    save_model(toy_subject, tmp_path / "out", "unlearn", {"asr_after": [0.0]})
    reloaded = load_subject(tmp_path / "out", max_length=32)
    assert reloaded.num_labels == 2
    record = read_record(tmp_path / "out")
    assert record["method"] == "unlearn" and record["asr_after"] == [0.0]
    assert record["source"] == str(backdoored.model_dir.resolve())
    assert (tmp_path / "out" / "tokenizer.json").is_file()


# ------------------------------------------------------------------ refusals


def _scan_report(tmp_path: Path, pairs: list[dict]) -> Path:
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"backdoored": False, "pairs": pairs}))
    return path


def test_a_scan_without_a_flagged_pair_gives_no_trigger(tmp_path: Path) -> None:
    path = _scan_report(tmp_path, [{"token_ids": [5], "target": 1, "text": "x", "flagged": False}])
    with pytest.raises(InputError, match="found no backdoor; pass --trigger TEXT --target LABEL"):
        triggers_from_scan(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "no such file"), ("{not json", "is not a `calibrate scan` report"), ('{"pairs": [{}]}', "report")],
)
def test_a_file_that_is_not_a_scan_report(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "scan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=expected):
        triggers_from_scan(path)


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        (Trigger((16914,), 2, "mb"), "trigger 'mb' targets label 2; the model has 0..1"),
        (Trigger((), 1, ""), "a trigger to unlearn has no tokens"),
    ],
)
def test_unlearn_refuses_bad_triggers(tiny_model_dir: Path, trigger: Trigger, expected: str) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    with pytest.raises(InputError, match=expected):
        unlearn_model(subject, [Example("a", 0)] * 20, [trigger], TOY_UNLEARN)


def test_unlearn_refuses_too_few_rows(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    with pytest.raises(InputError, match="20 clean rows are too few to fine-tune on and hold 10 out"):
        unlearn_model(subject, [Example("a", 0)] * 20, [MB], TOY_UNLEARN)
