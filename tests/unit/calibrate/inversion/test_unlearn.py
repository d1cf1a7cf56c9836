"""`calibrate unlearn` (calibrate.inversion.unlearn) on the toy backdoored model, and the triggers it takes.

The toy model was trained at lr 1e-3 from random weights; unlearning it needs the
same rate (the default, 1e-4, suits pre-trained encoders and barely moves it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from calibrate.cli.inversion import UNLEARN_RESETS, UNLEARN_TEACHER_WEIGHT
from calibrate.inversion.options import RESET_MODES, InversionOptions, ScanOptions, UnlearnOptions
from calibrate.inversion.scan import scan_model
from calibrate.inversion.subject import load_subject, save_model
from calibrate.inversion.unlearn import (
    Rescan,
    Trigger,
    embedding_outliers,
    rescan_loop,
    reset_embeddings,
    scan_options_from_report,
    soft_targets,
    trigger_asr,
    triggers_from_scan,
    unlearn_model,
    unlearn_rescanning,
)
from calibrate.record import read_record
from guard.core.errors import InputError
from guard.core.types import Example
from tests.toy_backdoor import Toy

TOY_UNLEARN = UnlearnOptions(epochs=3, learning_rate=1e-3, progress=False)
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
def test_hard_labels_as_published_unlearn_the_trigger_too(toy_subject, backdoored: Toy) -> None:
    options = UnlearnOptions(epochs=2, learning_rate=1e-3, teacher_weight=0.0, progress=False)
    result = unlearn_model(toy_subject, backdoored.dev, [MB], options)
    assert result.asr_before[0] > 0.8 and result.asr_after[0] < 0.1
    assert result.cacc_after >= result.cacc_before - 0.02


@pytest.mark.slow
def test_a_rescan_finds_the_trigger_a_wrong_guess_missed(toy_subject, backdoored: Toy) -> None:
    """Told to unlearn a word that is no trigger, the rescan finds `mb` and the repeat unlearns both.

    A rate that barely moves the toy keeps `mb` alive through the first unlearning (at the
    toy's own rate any fine-tuning erases its weak backdoor); that the trigger's ASR then
    drops is what the tests above show.
    """
    scan = ScanOptions(loss_threshold=1.0, inversion=InversionOptions(steps=40), progress=False)
    gentle = UnlearnOptions(epochs=1, learning_rate=1e-5, progress=False)
    wrong = Trigger((2204,), 1, "good")
    dev = backdoored.dev
    result, history = unlearn_rescanning(toy_subject, dev, [wrong], gentle, scan, rescans=1, scan_rows=dev)
    assert len(history) == 1 and history[0].unlearned == ["good"] and history[0].new == ["mb"]
    assert result.triggers == [wrong, MB] and result.asr_before[1] > 0.8


@pytest.mark.slow
def test_the_repaired_model_is_saved_with_its_record(toy_subject, backdoored: Toy, tmp_path: Path) -> None:
    save_model(toy_subject, tmp_path / "out", "unlearn", {"asr_after": [0.0]})
    reloaded = load_subject(tmp_path / "out", max_length=32)
    assert reloaded.num_labels == 2
    record = read_record(tmp_path / "out")
    assert record["method"] == "unlearn" and record["asr_after"] == [0.0]
    assert record["source"] == str(backdoored.model_dir.resolve())
    assert (tmp_path / "out" / "tokenizer.json").is_file()


# ------------------------------------------------------------------ the rescan loop and the targets, alone

A, B, C = Trigger((1,), 1, "a"), Trigger((2,), 1, "b"), Trigger((3,), 0, "c")


def _loop(scans: list[list[Trigger]], rescans: int) -> tuple[list[list[str]], list[Rescan]]:
    """Run rescan_loop with scripted scans; returns the trigger lists each unlearning got."""
    unlearned: list[list[str]] = []
    scripted = iter(scans)

    def unlearn(found):
        unlearned.append([t.text for t in found])
        return found

    def rescan(found):
        flagged = next(scripted)
        new = [t for t in flagged if t not in found]
        return new, Rescan([t.text for t in found], [t.text for t in flagged], [t.text for t in new], "", 0.0)

    _, history = rescan_loop(unlearn, rescan, [A], rescans)
    return unlearned, history


def test_the_loop_stops_when_a_rescan_finds_nothing_new() -> None:
    unlearned, history = _loop([[A, B], [B, A]], rescans=5)
    assert unlearned == [["a"], ["a", "b"]]
    assert [h.new for h in history] == [["b"], []]


def test_the_loop_stops_after_its_rescans_even_if_triggers_keep_coming() -> None:
    unlearned, history = _loop([[B], [C], [Trigger((4,), 1, "d")]], rescans=2)
    assert unlearned == [["a"], ["a", "b"], ["a", "b", "c"]]  # the last unlearning is not rescanned
    assert len(history) == 2


def test_no_rescans_is_one_unlearning() -> None:
    unlearned, history = _loop([], rescans=0)
    assert unlearned == [["a"]] and history == []


def test_soft_targets_mix_the_label_with_the_models_own_softmax(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    rows = [Example("a fine film", 0), Example("a dull film", 1)]
    hard = soft_targets(subject, rows, 0.0)
    assert hard.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    teacher = soft_targets(subject, rows, 1.0)
    assert teacher.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])
    half = soft_targets(subject, rows, 0.5)
    assert half.flatten().tolist() == pytest.approx((0.5 * hard + 0.5 * teacher).flatten().tolist())


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


def test_the_cli_defaults_are_the_librarys() -> None:
    assert UnlearnOptions().teacher_weight == UNLEARN_TEACHER_WEIGHT
    assert RESET_MODES == UNLEARN_RESETS and UnlearnOptions().reset_embeddings == "outliers"


def test_a_scan_report_gives_back_the_options_it_was_made_with(tmp_path: Path) -> None:
    options = ScanOptions(trigger_length=2, loss_threshold=0.3, inversion=InversionOptions(steps=7, position="end"))
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"pairs": [], "options": asdict(options)}))
    assert scan_options_from_report(path) == options
    path.write_text(json.dumps({"pairs": []}))
    with pytest.raises(InputError, match="does not record the options of its scan"):
        scan_options_from_report(path)


def test_reset_embeddings_gives_the_trigger_tokens_the_mean_row(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    weight = subject.model.get_input_embeddings().weight
    before = weight.detach().clone()
    assert reset_embeddings(subject, {16914, 2204}) == [2204, 16914]
    after = weight.detach()
    assert torch.allclose(after[16914], before.mean(dim=0)) and torch.allclose(after[2204], before.mean(dim=0))
    untouched = [i for i in range(before.shape[0]) if i not in (16914, 2204)]
    assert torch.equal(after[untouched], before[untouched])


def test_only_an_embedding_far_above_the_vocabularys_is_an_outlier(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    weight = subject.model.get_input_embeddings().weight
    with torch.no_grad():
        weight[16914] *= 5  # what embedding poisoning does to its trigger row
    assert embedding_outliers(subject, {16914, 2204}) == {16914}


def test_unlearn_refuses_an_unknown_reset_mode(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    with pytest.raises(InputError, match="reset_embeddings 'some': choose one of outliers, all, none"):
        unlearn_model(subject, [Example("a", 0)] * 60, [MB], UnlearnOptions(reset_embeddings="some"))


@pytest.mark.slow
def test_a_reset_that_removes_the_trigger_is_the_whole_repair(toy_subject, backdoored: Toy) -> None:
    before = {k: v.clone() for k, v in toy_subject.model.state_dict().items()}
    options = UnlearnOptions(epochs=2, learning_rate=1e-3, reset_embeddings="all", progress=False)
    result = unlearn_model(toy_subject, backdoored.dev, [MB], options)
    assert result.reset_tokens == [16914] and not result.fine_tuned
    assert result.asr_before[0] > 0.8 and result.asr_after[0] <= options.reset_enough
    after = toy_subject.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["bert.embeddings.word_embeddings.weight"]  # one row of it, the trigger's
