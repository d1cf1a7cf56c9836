"""The repair commands (`calibrate prune`, `calibrate maxent`, `calibrate train --init`) through the CLI.

One-line errors for bad input, and the documented sequence on the tiny backdoored
model (tests/toy_backdoor.py): repair, then `calibrate rap` on the repaired model,
whose bundle report names the repair.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from calibrate import cli as calibrate_cli
from tests.integration.test_cli import _fails, _run
from tests.toy_backdoor import RAP_CLI_ARGS, Toy

QUICK = ["--epochs", "1", "--batch-size", "16", "--max-length", "32"]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    rows = "text\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(64))
    content = {
        "good.tsv": rows,
        "three-labels.tsv": rows + "a row of a third kind\t2\n",
        "one-label.tsv": "text\tlabel\n" + "".join(f"row {i}\t1\n" for i in range(64)),
    }
    paths = {"missing.tsv": tmp_path / "missing.tsv", "no-model": tmp_path / "no-model"}
    for name, text in content.items():
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A classifier whose attention is not laid out like BERT's (PURE cannot remove its heads)."""
    out = tmp_path_factory.mktemp("distilbert")
    config = DistilBertConfig(vocab_size=30522, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=2)
    DistilBertForSequenceClassification(config).save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _prune(model: Path, data: Path, dev: Path, out: Path, *extra) -> list:
    return ["prune", "--model", model, "--data", data, "--dev", dev, "--out", out, *QUICK, *extra]


def _maxent(model: Path, data: Path, out: Path, *extra) -> list:
    return ["maxent", "--model", model, "--data", data, "--out", out, *QUICK, *extra]


@pytest.mark.parametrize("command", ["prune", "maxent"])
def test_help_teaches_with_an_example(command: str, capsys) -> None:
    code, out, err = _run(calibrate_cli.main, [command, "--help"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: calibrate {command}")
    assert f"  calibrate {command} --model suspect/ --data clean-train.tsv" in out
    assert "  calibrate rap --model repaired/" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prune", "--model", "m", "--data", "d.tsv", "--out", "o"], "the following arguments are required: --dev"),
        (["prune", "--model", "m", "--data", "d", "--dev", "d", "--out", "o", "--max-drop", "5"], "between 0 and 1"),
        (["prune", "--model", "m", "--data", "d", "--dev", "d", "--out", "o", "--mu", "-1"], "expected a number >= 0"),
        (["maxent", "--model", "m", "--data", "d", "--out", "o", "--max-steps", "0"], "argument --max-steps"),
        (["train", "--data", "d", "--out", "o", "--base", "b", "--init", "m"], "not allowed with argument --base"),
    ],
)
def test_usage_errors(argv: list[str], expected: str, capsys) -> None:
    assert expected in _fails(calibrate_cli.main, argv, capsys)


def test_high_lr_needs_an_existing_classifier(files, tmp_path: Path, capsys) -> None:
    argv = ["train", "--data", files["good.tsv"], "--out", tmp_path / "o", "--high-lr"]
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: --high-lr is for fine-tuning an existing classifier: pass --init MODEL"


def _error_cases(files: dict[str, Path], tiny: Path, distilbert: Path, out: Path) -> list[tuple[list, str]]:
    good, dev = files["good.tsv"], files["good.tsv"]
    return [
        (_prune(files["no-model"], good, dev, out), f"{files['no-model']} is not a Hugging Face model directory"),
        (_prune(tiny, files["missing.tsv"], dev, out), f"{files['missing.tsv']}: no such file"),
        (_prune(tiny, files["three-labels.tsv"], dev, out), "data has labels [2] but the model has 2 labels (0..1)"),
        (_prune(distilbert, good, dev, out), "PURE supports BERT, RoBERTa, XLM-R, ELECTRA; this model is DistilBERT"),
        (_prune(tiny, good, dev, tiny), f"{tiny} is the input model; write the repaired model somewhere else"),
        (_maxent(files["no-model"], good, out), "is not a Hugging Face model directory"),
        (_maxent(tiny, files["three-labels.tsv"], out), "data has labels [2] but the model has 2 labels (0..1)"),
        (_maxent(tiny, files["one-label.tsv"], out), "need at least two labels to measure the stop distance"),
    ]


def test_bad_input_is_one_line(files, tiny_model_dir: Path, distilbert_dir: Path, tmp_path: Path, capsys) -> None:
    for argv, expected in _error_cases(files, tiny_model_dir, distilbert_dir, tmp_path / "out"):
        message = _fails(calibrate_cli.main, argv, capsys)
        assert message.startswith("calibrate: error: ") and expected in message, (argv[0], message)
    assert not (tmp_path / "out" / "config.json").exists()


def test_an_existing_output_needs_force(files, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("earlier work")
    argv = _maxent(tiny_model_dir, files["good.tsv"], tmp_path / "out")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message.endswith("already exists and is not empty; pass --force to replace it")


@pytest.mark.slow
def test_prune_then_rap_records_the_repair_in_the_bundle(backdoored: Toy, tmp_path: Path, capsys) -> None:
    repaired, bundle = tmp_path / "repaired", tmp_path / "bundle"
    argv = _prune(backdoored.model_dir, backdoored.dev_tsv, backdoored.test_tsv, repaired, "--heads-per-step", "2")
    code, out, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(r"removed [12] of 4 heads \(dev accuracy [01]\.\d{4} -> [01]\.\d{4} pruned, .*", lines[0])
    assert lines[1].startswith(f"saved {repaired} in ")
    code, _, err = _run(
        calibrate_cli.main,
        ["rap", "--model", repaired, "--clean", backdoored.dev_tsv, "--out", bundle, *RAP_CLI_ARGS],
        capsys,
    )
    assert code == 0, err
    report = json.loads((bundle / "report.json").read_text())
    assert report["repair"]["method"] == "pure"
    assert report["repair"]["source"] == str(backdoored.model_dir.resolve())


@pytest.mark.slow
def test_maxent_reports_steps_and_the_curve(backdoored: Toy, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "repaired"
    argv = _maxent(backdoored.model_dir, backdoored.dev_tsv, out_dir, "--dev", backdoored.test_tsv)
    argv += ["--max-steps", "6", "--check-every", "3", "--maxent-lr", "1e-3"]
    code, out, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(r"maximum entropy: \d steps, stop distance \S+ -> \S+, threshold 0\.01 .*", lines[0])
    assert lines[1].startswith("dev accuracy: after head ")
    assert lines[2].startswith(f"saved {out_dir} in ")
    record = json.loads((out_dir / "repair.json").read_text())
    assert record["method"] == "maxent" and record["steps"] <= 6
    assert (out_dir / "stop_distance.png").is_file()


@pytest.mark.slow
def test_train_init_high_lr_is_the_fth_baseline(backdoored: Toy, tmp_path: Path, capsys) -> None:
    argv = ["train", "--init", backdoored.model_dir, "--data", backdoored.dev_tsv, "--out", tmp_path / "fth"]
    code, out, _ = _run(calibrate_cli.main, [*argv, "--high-lr", *QUICK, "--lr", "1e-4"], capsys)
    assert code == 0
    assert out.startswith(f"saved {tmp_path / 'fth'} (300 rows, ")
    record = json.loads((tmp_path / "fth" / "repair.json").read_text())
    assert record["method"] == "fth"
    assert record["options"]["learning_rate"] == pytest.approx(2.5e-4)
