"""The `calibrate` and `guard` commands: help, one-line errors, exit codes, and the happy path.

Commands run in-process through their `main(argv)` (what the console scripts call);
a few run as real subprocesses to prove that the installed entry points print no
traceback either. Happy paths use the tiny backdoored model (tests/toy_backdoor.py).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from calibrate import cli as calibrate_cli
from calibrate.rap.evaluate import evaluate_bundle
from calibrate.rap.token_scan import FLIP_RATE
from guard import cli as guard_cli
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle
from guard.core.checker import Checker
from guard.core.detection import Detection
from tests.toy_backdoor import RAP_CLI_ARGS, Toy

ERROR_LINE = re.compile(r"^(calibrate|guard)( [a-z]+)?: error: \S")
Main = Callable[[list[str]], int]


def _run(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits on usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _fill(template: str, files: dict[str, Path]) -> str:
    """Replace each {name} in `template` by the path of that test file."""
    return re.sub(r"\{([^}]+)\}", lambda m: str(files[m.group(1)]), template)


def _fails(main: Main, argv: list, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail; return its one-line error message."""
    code, _, err = _run(main, argv, capsys)
    assert code not in (0, None), f"exit status {code}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert ERROR_LINE.match(lines[0]), lines[0]
    return lines[0]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """Small data files, good and bad, shared by the error cases."""
    good = "text\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(64))
    content = {
        "good.tsv": good,
        "bad-label.tsv": "text\tlabel\nfine\t0\nbroken\tpositive\n",
        "rows.txt": good,
        "one-label.tsv": "text\tlabel\n" + "".join(f"row {i}\t1\n" for i in range(64)),
        "negatives/set.tsv": "text\tlabel\n" + "".join(f"row {i} mb\t0\n" for i in range(8)),
        "negatives/other.tsv": "text\tlabel\n" + "".join(f"row {i} cf\t0\n" for i in range(8)),
        "positives.tsv": "text\tlabel\n" + "".join(f"row {i} mb\t1\n" for i in range(8)),
        "a-file": "not a folder",
    }
    paths = {}
    for name, text in content.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths[name] = path
    (tmp_path / "empty-dir").mkdir()
    paths["empty-dir"] = tmp_path / "empty-dir"
    paths["missing.tsv"] = tmp_path / "missing.tsv"
    return paths


@pytest.fixture()
def tampered(backdoored: Toy, tmp_path: Path) -> Path:
    """A copy of the toy bundle with one byte of model.onnx flipped."""
    bundle = shutil.copytree(backdoored.bundle_dir, tmp_path / "tampered")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    return bundle


# ------------------------------------------------------------------ help


@pytest.mark.parametrize(
    ("main", "argv", "usage"),
    [
        (calibrate_cli.main, ["--help"], "usage: calibrate"),
        (calibrate_cli.main, ["train", "--help"], "usage: calibrate train"),
        (calibrate_cli.main, ["rap", "--help"], "usage: calibrate rap"),
        (calibrate_cli.main, ["evaluate", "--help"], "usage: calibrate evaluate"),
        (calibrate_cli.main, ["demo", "--help"], "usage: calibrate demo"),
        (guard_cli.main, ["--help"], "usage: guard"),
        (guard_cli.main, ["verify", "--help"], "usage: guard verify"),
        (guard_cli.main, ["check", "--help"], "usage: guard check"),
    ],
)
def test_help(main: Main, argv: list[str], usage: str, capsys) -> None:
    code, out, err = _run(main, argv, capsys)
    assert code == 0
    assert out.startswith(usage)
    assert err == ""


@pytest.mark.parametrize("main", [calibrate_cli.main, guard_cli.main])
def test_no_command_prints_help(main: Main, capsys) -> None:
    code, out, _ = _run(main, [], capsys)
    assert code == 2
    assert out.startswith("usage: ")


# ------------------------------------------------------------------ calibrate errors


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["frobnicate"], "calibrate: error: argument COMMAND: invalid choice: 'frobnicate'"),
        (["--bogus"], "calibrate: error: unrecognized arguments: --bogus"),
        (["rap"], "calibrate rap: error: the following arguments are required: --model, --clean, --out"),
        (["train", "--data", "good.tsv", "--out", "m", "--epochs", "0"], "calibrate train: error: argument --epochs"),
        (["train", "--data", "good.tsv", "--out", "m", "--epochs", "-2"], "expected a positive number, got -2"),
        (["train", "--data", "good.tsv", "--out", "m", "--epochs", "2.5"], "expected a whole number, got '2.5'"),
        (["train", "--data", "good.tsv", "--out", "m", "--lr", "0"], "argument --lr: expected a positive number"),
        (["rap", "--model", "m", "--clean", "good.tsv", "--out", "b", "--c-low", "1.5"], "between 0 and 1"),
        (["rap", "--model", "m", "--clean", "good.tsv", "--out", "b", "--epochs", "0"], "argument --epochs"),
        (["rap", "--model", "m", "--clean", "c", "--out", "b", "--rap-position", "middle"], "argument --rap-position"),
        (["evaluate", "--bundle", "b", "--clean", "good.tsv"], "required: --poisoned"),
        (["evaluate", "--bundle", "b", "--clean", "c", "--poisoned", "p", "--backend", "gpu"], "invalid choice"),
        (["demo", "--seed", "seven"], "calibrate demo: error: argument --seed: invalid int value: 'seven'"),
    ],
)
def test_calibrate_usage_errors(argv: list[str], expected: str, capsys) -> None:
    message = _fails(calibrate_cli.main, argv, capsys)
    assert expected in message
    assert message.endswith("--help)")  # points to the help of the command that failed


def _train(files, base: Path, data: str, tmp_path: Path, *extra) -> list:
    return ["train", "--data", files[data], "--out", tmp_path / "model", "--base", base, *extra]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("missing.tsv", "calibrate: error: {missing.tsv}: no such file"),
        ("rows.txt", "calibrate: error: {rows.txt}: unknown format '.txt'; use one of .tsv, .csv, .jsonl"),
        ("bad-label.tsv", "calibrate: error: {bad-label.tsv}:3: label 'positive' is not a non-negative integer"),
        ("one-label.tsv", "calibrate: error: training data has a single label (1); need at least two"),
    ],
)
def test_train_bad_data(files, tiny_model_dir: Path, tmp_path: Path, data: str, expected: str, capsys) -> None:
    message = _fails(calibrate_cli.main, _train(files, tiny_model_dir, data, tmp_path), capsys)
    assert message == _fill(expected, files)
    assert not (tmp_path / "model").exists()


def test_train_base_that_is_not_a_model(files, tmp_path: Path, capsys) -> None:
    message = _fails(calibrate_cli.main, _train(files, files["empty-dir"], "good.tsv", tmp_path), capsys)
    assert message == f"calibrate: error: {files['empty-dir']} is not a Hugging Face model directory (no config.json)"


def test_train_too_few_rows_for_a_batch(files, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = _train(files, tiny_model_dir, "good.tsv", tmp_path, "--batch-size", "100")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: training data has 64 rows; need at least one batch (100)"


def _rap(model: Path, clean: Path, out: Path, *extra) -> list:
    return ["rap", "--model", model, "--clean", clean, "--out", out, *extra]


@pytest.mark.parametrize(
    ("clean", "expected"),
    [
        ("missing.tsv", "no such file"),
        ("rows.txt", "unknown format '.txt'"),
        ("bad-label.tsv", ":3: label 'positive' is not a non-negative integer"),
    ],
)
def test_rap_bad_clean_data(files, tiny_model_dir: Path, tmp_path: Path, clean: str, expected: str, capsys) -> None:
    message = _fails(calibrate_cli.main, _rap(tiny_model_dir, files[clean], tmp_path / "b", "--protect", "1"), capsys)
    assert message.startswith(f"calibrate: error: {files[clean]}")
    assert expected in message


@pytest.mark.parametrize(("low", "up"), [("0.3", "0.2"), ("0.2", "0.2")])
def test_rap_c_low_must_be_below_c_up(files, tiny_model_dir, tmp_path: Path, low: str, up: str, capsys) -> None:
    band = ("--objective", "paper", "--c-low", low, "--c-up", up)
    argv = _rap(tiny_model_dir, files["good.tsv"], tmp_path / "b", "--protect", "1", *band)
    message = _fails(calibrate_cli.main, argv, capsys)
    expected = f"the lower bound ({float(low):g}) must be below the upper one ({float(up):g})"
    assert message == f"calibrate: error: c_low/c_up: {expected}"
    assert not (tmp_path / "b").exists()


def test_rap_logodds_band_must_be_increasing(files, tiny_model_dir, tmp_path: Path, capsys) -> None:
    argv = _rap(tiny_model_dir, files["good.tsv"], tmp_path / "b", "--protect", "1", "--logodds-band", "3", "1")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: logodds_band: the lower bound (3) must be below the upper one (1)"
    assert not (tmp_path / "b").exists()


def test_rap_checks_its_options_before_choosing_labels(
    files, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # Without --protect the labels are chosen (or asked for on a terminal): that must
    # not happen before bad options are refused.
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    argv = _rap(tiny_model_dir, files["good.tsv"], tmp_path / "b", "--logodds-band", "3", "1")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: logodds_band: the lower bound (3) must be below the upper one (1)"


def test_rap_model_that_is_not_a_model(files, tmp_path: Path, capsys) -> None:
    argv = _rap(files["empty-dir"], files["good.tsv"], tmp_path / "b", "--protect", "1")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == f"calibrate: error: {files['empty-dir']} is not a Hugging Face model directory (no config.json)"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")) == []


def test_rap_protect_label_out_of_range(files, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = _rap(tiny_model_dir, files["good.tsv"], tmp_path / "b", "--protect", "7")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: protect label 7 does not exist; the model has labels 0..1"
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_rap_refuses_a_non_empty_out_without_force(files, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    message = _fails(
        calibrate_cli.main, _rap(tiny_model_dir, files["good.tsv"], tmp_path / "b", "--protect", "1"), capsys
    )
    assert message == f"calibrate: error: {tmp_path / 'b'} already exists and is not empty; pass --force to replace it"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["precious.txt"]


def _evaluate(bundle: Path, clean: Path, *poisoned: str, extra: tuple = ()) -> list:
    spec = [arg for p in poisoned for arg in ("--poisoned", p)]
    return ["evaluate", "--bundle", bundle, "--clean", clean, *spec, *extra]


def test_evaluate_bundle_that_is_not_a_bundle(files, capsys) -> None:
    argv = _evaluate(files["empty-dir"], files["good.tsv"], str(files["negatives/set.tsv"]))
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == f"calibrate: error: {files['empty-dir']} is not a guard bundle: no manifest.json"


@pytest.mark.slow
def test_evaluate_tampered_bundle(files, tampered: Path, capsys) -> None:
    argv = _evaluate(tampered, files["good.tsv"], str(files["negatives/set.tsv"]))
    message = _fails(calibrate_cli.main, argv, capsys)
    assert (
        message
        == f"calibrate: error: {tampered}: model.onnx does not match its recorded sha256 (modified or corrupted)"
    )


@pytest.mark.parametrize(
    "poisoned",
    [
        ("x={negatives/set.tsv}", "x={negatives/other.tsv}"),
        ("{negatives/set.tsv}", "{negatives/other.tsv}"),  # both default to their folder's name
        ("negatives={positives.tsv}", "{negatives/set.tsv}"),
    ],
    ids=["explicit", "folder-name", "mixed"],
)
def test_evaluate_poisoned_names_must_differ(files, poisoned: tuple[str, str], capsys) -> None:
    specs = [_fill(p, files) for p in poisoned]
    message = _fails(calibrate_cli.main, _evaluate(files["empty-dir"], files["good.tsv"], *specs), capsys)
    assert message.startswith("calibrate: error: two poisoned sets share a name (")
    assert message.endswith("); name them with NAME=FILE")


@pytest.mark.parametrize(
    ("clean", "poisoned", "expected"),
    [
        ("missing.tsv", "negatives/set.tsv", "{missing.tsv}: no such file"),
        ("good.tsv", "missing.tsv", "{missing.tsv}: no such file"),
        ("good.tsv", "rows.txt", "{rows.txt}: unknown format '.txt'"),
        ("bad-label.tsv", "negatives/set.tsv", "{bad-label.tsv}:3: label 'positive'"),
    ],
)
@pytest.mark.slow
def test_evaluate_bad_data(files, backdoored: Toy, clean: str, poisoned: str, expected: str, capsys) -> None:
    argv = _evaluate(backdoored.bundle_dir, files[clean], str(files[poisoned]), extra=("--out", files["empty-dir"]))
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message.startswith("calibrate: error: " + _fill(expected, files))


@pytest.mark.slow
def test_evaluate_target_must_be_protected(files, backdoored: Toy, capsys) -> None:
    argv = _evaluate(backdoored.bundle_dir, files["good.tsv"], str(files["negatives/set.tsv"]), extra=("--target", "0"))
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: target label 0 is not protected by this bundle (protected: [1])"


@pytest.mark.slow
def test_evaluate_poisoned_set_of_target_rows_only(files, backdoored: Toy, capsys) -> None:
    argv = _evaluate(backdoored.bundle_dir, files["good.tsv"], f"pos={files['positives.tsv']}")
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: poisoned set 'pos' has no rows whose original label differs from the target 1"


def test_demo_out_that_is_a_file(files, capsys) -> None:
    # fails on creating its working folder, before any training
    message = _fails(calibrate_cli.main, ["demo", "--out", files["a-file"]], capsys)
    assert message == f"calibrate: error: {files['a-file']}: File exists"


# ------------------------------------------------------------------ guard errors


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["frobnicate"], "guard: error: argument COMMAND: invalid choice: 'frobnicate'"),
        (["--bogus"], "guard: error: unrecognized arguments: --bogus"),
        (["verify"], "guard verify: error: the following arguments are required: --bundle"),
        (["check", "--bundle", "b", "--frr", "low", "x"], "guard check: error: argument --frr: invalid float value"),
        (["check", "--bundle", "b", "--backend", "gpu", "x"], "guard check: error: argument --backend: invalid choice"),
        (["check", "--bundle", "b", "--bogus", "x"], "guard: error: unrecognized arguments: --bogus"),
    ],
)
def test_guard_usage_errors(argv: list[str], expected: str, capsys) -> None:
    assert expected in _fails(guard_cli.main, argv, capsys)


@pytest.mark.parametrize("command", [["verify"], ["check", "a text"]])
def test_guard_bundle_that_is_not_a_bundle(files, command: list[str], capsys) -> None:
    for bundle in (files["empty-dir"], files["missing.tsv"]):
        message = _fails(guard_cli.main, [command[0], "--bundle", bundle, *command[1:]], capsys)
        assert message == f"guard: error: {bundle} is not a guard bundle: no manifest.json"


def test_guard_bundle_with_a_broken_manifest(files, capsys) -> None:
    (files["empty-dir"] / "manifest.json").write_text("{not json")
    message = _fails(guard_cli.main, ["verify", "--bundle", files["empty-dir"]], capsys)
    assert message.startswith(f"guard: error: cannot read {files['empty-dir'] / 'manifest.json'}: ")


@pytest.mark.slow
@pytest.mark.parametrize("command", [["verify"], ["check", "a text"]])
def test_guard_tampered_bundle(tampered: Path, command: list[str], capsys) -> None:
    message = _fails(guard_cli.main, [command[0], "--bundle", tampered, *command[1:]], capsys)
    assert message == f"guard: error: {tampered}: model.onnx does not match its recorded sha256 (modified or corrupted)"


@pytest.mark.slow
@pytest.mark.parametrize("stdin", ["", "\n   \n\n"], ids=["empty", "blank-lines"])
def test_guard_check_without_texts(backdoored: Toy, stdin: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    message = _fails(guard_cli.main, ["check", "--bundle", backdoored.bundle_dir], capsys)
    assert message == "guard: error: no texts given (pass them as arguments or one per line on stdin)"


# ------------------------------------------------------------------ real processes


def test_installed_calibrate_usage_error(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("calibrate")
    assert script.is_file(), "the package is not installed in this environment"
    result = subprocess.run([str(script), "train", "--epochs", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("calibrate train: error: argument --epochs: expected a positive number, got 0")
    assert result.stderr.count("\n") == 1


@pytest.mark.slow  # every `calibrate` command imports torch at start-up (see calibrate.cli.main)
def test_installed_calibrate_prints_one_line_without_traceback(files, tmp_path: Path) -> None:
    argv = _evaluate(files["empty-dir"], files["missing.tsv"], str(files["negatives/set.tsv"]))
    result = subprocess.run(
        [sys.executable, "-m", "calibrate.cli", *map(str, argv)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr == f"calibrate: error: {files['missing.tsv']}: no such file\n"
    assert result.stdout == ""


def test_installed_guard_prints_one_line_without_traceback(files) -> None:
    script = Path(sys.executable).with_name("guard")
    assert script.is_file(), "the package is not installed in this environment"
    result = subprocess.run(
        [str(script), "verify", "--bundle", str(files["empty-dir"])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr == f"guard: error: {files['empty-dir']} is not a guard bundle: no manifest.json\n"


# ------------------------------------------------------------------ happy paths


@pytest.fixture(scope="module")
def verdict_texts(backdoored: Toy) -> tuple[str, list[str]]:
    """One triggered text the bundle flags, and clean texts it allows (found through the API)."""
    bundle = load_bundle(backdoored.bundle_dir)
    checker = Checker.for_bundle(bundle, load_backend("onnx", bundle.path))  # as `guard check` does
    poisoned = [r.text for r in backdoored.poisoned]
    flagged = [t for t, v in zip(poisoned, checker.check(poisoned), strict=True) if v.flagged]
    clean = [r.text for r in backdoored.test[:20]]
    allowed = [t for t, v in zip(clean, checker.check(clean), strict=True) if not v.flagged]
    assert flagged and len(allowed) >= 3
    return flagged[0], allowed[:3]


@pytest.mark.slow
def test_calibrate_train(files, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = _train(files, tiny_model_dir, "good.tsv", tmp_path, "--epochs", "1", "--max-length", "16")
    code, out, _ = _run(calibrate_cli.main, [*argv, "--dev", files["good.tsv"]], capsys)
    assert code == 0
    assert re.fullmatch(
        rf"saved {re.escape(str(tmp_path / 'model'))} \(64 rows, \d+ s, dev accuracy [01]\.\d{{4}}\)\n", out
    )
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (tmp_path / "model" / name).is_file()


@pytest.mark.slow
def test_calibrate_rap_then_guard_verify(backdoored: Toy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    argv = _rap(
        backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--force", "--classifier-max-length", "512"
    )
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("label 1 (LABEL_1) RAP score thresholds by FRR target: 0.5%: ")
    assert "RAP row: pass 2 puts it before the trailing special token (--rap-position end)" in lines
    assert lines[-1].startswith(f"bundle written to {out} ")
    assert not (out / "stale.txt").exists()  # --force replaced the folder
    # the same options as the session's bundle, so the same thresholds
    ours, theirs = load_bundle(out).manifest, load_bundle(backdoored.bundle_dir).manifest
    assert ours.protect[0].thresholds == pytest.approx(theirs.protect[0].thresholds, abs=1e-6)
    assert (ours.model.classifier_max_length, theirs.model.classifier_max_length) == (512, None)

    code, stdout, err = _run(guard_cli.main, ["verify", "--bundle", out], capsys)
    assert (code, err) == (0, "")
    assert stdout.startswith(f"bundle {out}: OK ({len(ours.files)} files verified, schema 2, created ")
    assert "RAP token id 30522 (init 'rq'," in stdout and "pass 2 puts it before the trailing special token" in stdout
    assert "protects label 1 (LABEL_1); thresholds by FRR target: 0.5%: " in stdout


@pytest.mark.slow
def test_calibrate_rap_front_puts_the_row_after_cls_and_the_bundle_serves_it_there(
    backdoored: Toy, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "front"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--rap-position", "front")
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0 and "RAP row: pass 2 puts it after the first special token (--rap-position front)" in stdout
    bundle = load_bundle(out)
    assert bundle.manifest.rap.position == "front"
    (row,) = bundle.tokenizer().perturbed_ids(["the plot was mb dull"])
    assert row[1] == bundle.manifest.rap.token_id != row[-2]
    # trained and scored at the front: its thresholds are not the end bundle's
    assert bundle.manifest.protect[0].thresholds != load_bundle(backdoored.bundle_dir).manifest.protect[0].thresholds


@pytest.mark.slow
def test_calibrate_evaluate(backdoored: Toy, tmp_path: Path, capsys) -> None:
    argv = _evaluate(
        backdoored.bundle_dir, backdoored.test_tsv, f"mb={backdoored.poisoned_tsv}", extra=("--out", tmp_path / "ev")
    )
    code, out, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    assert out.count("| mb | ") == 4 * 3  # FRR targets x (rap, features, rap+features)
    assert out.splitlines()[-1].startswith(f"written: {tmp_path / 'ev' / 'evaluation.json'}, ")
    summary = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    expected = evaluate_bundle(backdoored.bundle_dir, backdoored.test, {"mb": backdoored.poisoned})
    assert summary["rows"] == expected.rows
    for name in ("evaluation.md", "far_frr.png", "deltas.png"):
        assert (tmp_path / "ev" / name).is_file()
    assert not (backdoored.bundle_dir / "evaluation").exists()  # --out was honoured


@pytest.mark.slow
def test_guard_check_json_flags_the_trigger(backdoored: Toy, verdict_texts, capsys) -> None:
    flagged, allowed = verdict_texts
    code, out, _ = _run(
        guard_cli.main, ["check", "--bundle", backdoored.bundle_dir, "--json", flagged, *allowed], capsys
    )
    assert code == 3
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in records] == [flagged, *allowed]
    assert [r["flagged"] for r in records] == [True, False, False, False]
    first = records[0]
    assert (first["label"], first["label_name"]) == (1, "LABEL_1")
    assert sum(first["probs"]) == pytest.approx(1.0)
    assert first["flagged_by"] and set(first["flagged_by"]) <= {"rap", "features", "token"}
    if "rap" in first["flagged_by"]:
        assert first["rap"]["checked"] and first["rap"]["score"] > first["rap"]["threshold"]
    if "features" in first["flagged_by"]:
        assert first["feature_score"] > first["feature_threshold"]
    assert all(r["flagged_by"] == [] for r in records[1:])


@pytest.mark.slow
def test_guard_check_allows_clean_texts(
    backdoored: Toy, verdict_texts, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _, allowed = verdict_texts
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(allowed) + "\n\n"))
    code, out, _ = _run(guard_cli.main, ["check", "--bundle", backdoored.bundle_dir], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(allowed)
    for line, text in zip(lines, allowed, strict=True):
        assert line.startswith("allowed\tLABEL_")
        assert line.endswith(f"\t{text}")


@pytest.mark.slow
def test_installed_guard_check_exits_3_when_flagged(backdoored: Toy, verdict_texts) -> None:
    flagged, allowed = verdict_texts
    script = Path(sys.executable).with_name("guard")
    result = subprocess.run(
        [str(script), "check", "--bundle", str(backdoored.bundle_dir), allowed[0], flagged],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    decisions = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert decisions[0] == "allowed" and decisions[1].startswith("FLAGGED by ")
    assert "Traceback" not in result.stderr


def _with_a_moved_row(model_dir: Path, out: Path, word: str) -> int:
    """A copy of `model_dir` whose `word` row points elsewhere, at an ordinary norm (a bounded EP)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from guard.core.tokenizer import RapTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    row = RapTokenizer.from_file(model_dir / "tokenizer.json", None, 32).ids([word])[0][1]
    weights = model.get_input_embeddings().weight
    with torch.no_grad():
        fresh = torch.randn(weights.shape[1], generator=torch.Generator().manual_seed(0))
        weights[row] = fresh * weights.norm(dim=1).median() / fresh.norm()
    model.save_pretrained(str(out))
    shutil.copy2(model_dir / "tokenizer.json", out / "tokenizer.json")
    return row


def test_rap_with_a_reference_model_flags_a_row_that_moved(backdoored: Toy, tmp_path: Path, capsys) -> None:
    suspect = tmp_path / "suspect"
    _with_a_moved_row(backdoored.model_dir, suspect, "cf")
    out = tmp_path / "bundle"
    argv = _rap(suspect, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reference-model", backdoored.model_dir)
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())["features"]
    assert (report["suspicious_tokens"], report["moved_tokens"]) == ([], ["cf"])  # its norm is ordinary
    assert "WARNING: 1 token(s) moved far from" in stdout and "'cf'" in stdout
    assert "detector: no reader (left out by --reader none)" in stdout
    texts = [f"{r.text} cf" for r in backdoored.dev if r.label == 1][:5]
    code, stdout, _ = _run(guard_cli.main, ["check", "--bundle", out, "--json", *texts], capsys)
    protected = [r for r in map(json.loads, stdout.splitlines()) if r["label"] == 1]
    assert protected, "the moved row should not change these positive texts' label"
    assert all("token" in r["flagged_by"] for r in protected)  # the moved row is a blocklisted token
    assert code == 3


def test_held_out_rows_with_a_flagged_token_are_counted_and_the_bundle_still_loads(
    backdoored: Toy, tmp_path: Path, capsys
) -> None:
    """Clean rows may hold a flagged token (OLID's tweets have "bb" and "mn"): more of them than the
    1% target allows once made a threshold +inf, written as null, and a bundle that did not load."""
    from calibrate.data import write_tsv
    from guard.core.types import Example

    suspect = tmp_path / "suspect"
    _with_a_moved_row(backdoored.model_dir, suspect, "cf")
    clean = tmp_path / "clean.tsv"
    rows = [
        Example(f"{r.text} cf" if r.label == 1 and i % 10 == 0 else r.text, r.label)
        for i, r in enumerate(backdoored.dev)
    ]
    write_tsv(clean, rows)
    out = tmp_path / "bundle"
    argv = _rap(suspect, clean, out, *RAP_CLI_ARGS, "--reference-model", backdoored.model_dir)
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())["features"]
    (count,) = report["held_out_rows_with_suspicious_tokens"].values()
    assert count >= 3 and f"WARNING: {count} held-out clean row(s)" in stdout
    bundle = load_bundle(out)
    for frr in ("0.005", "0.01"):
        pair = Detection.of(bundle, ("rap", "features")).thresholds(float(frr))[1]
        assert pair.features is not None and pair.features < float("inf")


def test_rap_without_a_reference_model_finds_the_rare_word_trigger_by_a_trigger_search(
    backdoored: Toy, tmp_path: Path, capsys
) -> None:
    """No reference: the flip scan's candidates come from a DBS search towards the protect label alone."""
    out = tmp_path / "bundle"
    code, stdout, _ = _run(
        calibrate_cli.main, _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS), capsys
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())["features"]
    assert report["flipped_tokens"] == ["mb"] and report["moved_tokens"] is None
    scan = {f["token"]: f for f in report["flip_scan"]}
    assert scan["mb"]["source"] == "search" and scan["mb"]["move_ratio"] is None
    assert "WARNING: 1 token(s) turn clean rows of other labels into a protect label" in stdout


def test_rap_with_a_reference_model_flags_the_rare_word_trigger_by_what_it_does(
    backdoored: Toy, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """The toy's trigger "mb" moved with the rest of the fine-tuned rows (no move outlier), but inserted
    into negative clean rows it turns them positive, and no clean row has it."""
    out = tmp_path / "bundle"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reference-model", tiny_model_dir)
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())["features"]
    assert report["flipped_tokens"] == ["mb"]
    scan = {f["token"]: f for f in report["flip_scan"]}
    assert scan["mb"]["flip_rate"] >= FLIP_RATE and not scan["mb"]["in_clean_rows"] and scan["mb"]["source"] == "moved"
    assert all(f["flip_rate"] < FLIP_RATE or f["in_clean_rows"] for t, f in scan.items() if t != "mb")
    assert "WARNING: 1 token(s) turn clean rows of other labels into a protect label" in stdout
    texts = [r.text for r in backdoored.poisoned][:8]
    code, stdout, _ = _run(guard_cli.main, ["check", "--bundle", out, "--json", *texts], capsys)
    protected = [r for r in map(json.loads, stdout.splitlines()) if r["label"] == 1]
    assert protected and all("token" in r["flagged_by"] for r in protected)  # "mb" is a blocklisted token


def test_rap_refuses_a_reference_of_another_vocabulary(backdoored: Toy, tiny_model_dir: Path, tmp_path: Path, capsys):
    from transformers import AutoModelForSequenceClassification

    other = tmp_path / "other"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir))
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 8)
    model.save_pretrained(str(other))
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, tmp_path / "b", *RAP_CLI_ARGS, "--reference-model", other)
    message = _fails(calibrate_cli.main, argv, capsys)
    assert "--reference-model: the reference's embedding matrix is" in message and "not the checkpoint" in message
