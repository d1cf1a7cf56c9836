"""`calibrate scan | unlearn | harden` and `rap --probes`: help, one-line errors, and the path end to end.

The happy path runs on the toy backdoored model (tests/toy_backdoor.py): scan finds
"mb", its probes go into a bundle through `calibrate rap --probes`, the bundle
loads and the server's canary replays the probes into the live FAR gauge;
`unlearn --scan` removes the trigger; `harden` runs a short schedule.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from calibrate import cli as calibrate_cli
from calibrate.record import read_record
from guard.api.app import create_app
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle
from guard.core.checker import Checker
from guard.monitoring import load_probe_rows
from guard.settings import Settings
from tests.integration.test_cli import _fails, _run
from tests.server_fixtures import asgi_client, metric_value
from tests.toy_backdoor import RAP_CLI_ARGS, Toy

TOY_SCAN = ["--max-length", "32", "--steps", "40", "--loss-threshold", "1.0"]  # the toy trigger is weak
TOY_TUNE = ["--max-length", "32", "--lr", "1e-3"]  # the toy model was trained from scratch at this rate


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("scan", "calibrate scan --model suspect/ --clean dev.tsv --out scan.json --probes-out probes.jsonl"),
        ("unlearn", "calibrate unlearn --model suspect/ --clean train.tsv --scan scan.json --out repaired/"),
        ("harden", "calibrate harden --model model/ --clean train-sample.tsv --out hardened/"),
    ],
)
def test_help_teaches_with_an_example(command: str, example: str, capsys) -> None:
    code, out, err = _run(calibrate_cli.main, [command, "--help"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: calibrate {command}")
    assert example in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["scan"], "calibrate scan: error: the following arguments are required: --model, --clean"),
        (["scan", "--model", "m", "--clean", "c", "--length", "0"], "argument --length: expected a positive number"),
        (["scan", "--model", "m", "--clean", "c", "--position", "top"], "argument --position: invalid choice"),
        (["scan", "--model", "m", "--clean", "c", "--criterion", "f1"], "argument --criterion: invalid choice"),
        (
            ["unlearn", "--model", "m", "--clean", "c", "--out", "o"],
            "one of the arguments --scan --trigger is required",
        ),
        (
            ["unlearn", "--model", "m", "--clean", "c", "--out", "o", "--scan", "s", "--trigger", "mb"],
            "argument --trigger: not allowed with argument --scan",
        ),
        (["harden", "--model", "m", "--clean", "c", "--out", "o", "--asr-bound", "1.5"], "between 0 and 1"),
        (["unlearn", "--model", "m", "--clean", "c", "--out", "o", "--rescans", "-1"], "expected a number >= 0"),
        (["unlearn", "--model", "m", "--clean", "c", "--out", "o", "--teacher-weight", "2"], "between 0 and 1"),
    ],
)
def test_usage_errors(argv: list[str], expected: str, capsys) -> None:
    message = _fails(calibrate_cli.main, argv, capsys)
    assert expected in message
    assert message.endswith("--help)")


def test_unlearn_trigger_needs_a_target(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["unlearn", "--model", tiny_model_dir, "--clean", "c.tsv", "--out", tmp_path / "o", "--trigger", "mb"]
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == "calibrate: error: --trigger needs --target LABEL (the label the trigger flips rows to)"


@pytest.mark.parametrize("command", ["unlearn", "harden"])
def test_repairs_never_write_over_their_input(tiny_model_dir: Path, command: str, capsys) -> None:
    extra = ["--trigger", "mb", "--target", "1"] if command == "unlearn" else []
    argv = [command, "--model", tiny_model_dir, "--clean", "c.tsv", "--out", tiny_model_dir, *extra]
    message = _fails(calibrate_cli.main, argv, capsys)
    assert message == f"calibrate: error: {tiny_model_dir} is the input model; write the repaired model somewhere else"


def test_scan_checks_its_output_folders_first(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["scan", "--model", tiny_model_dir, "--clean", "c.tsv", "--out", tmp_path / "nowhere" / "scan.json"]
    message = _fails(calibrate_cli.main, argv, capsys)
    assert (
        message
        == f"calibrate: error: {tmp_path / 'nowhere' / 'scan.json'}: its folder {tmp_path / 'nowhere'} does not exist"
    )


def test_unlearn_scan_report_that_does_not_exist(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["unlearn", "--model", tiny_model_dir, "--clean", "c.tsv", "--out", tmp_path / "o", "--scan", tmp_path / "s"]
    assert _fails(calibrate_cli.main, argv, capsys) == f"calibrate: error: {tmp_path / 's'}: no such file"


@pytest.mark.slow
def test_rap_refuses_probes_with_labels_the_model_lacks(backdoored: Toy, tmp_path: Path, capsys) -> None:
    (tmp_path / "probes.jsonl").write_text('{"text": "mb it was dull .", "label": 5}\n')
    argv = ["rap", "--model", backdoored.model_dir, "--clean", backdoored.dev_tsv, "--out", tmp_path / "b"]
    message = _fails(calibrate_cli.main, [*argv, *RAP_CLI_ARGS, "--probes", tmp_path / "probes.jsonl"], capsys)
    assert message == "calibrate: error: probes have labels [5] but the model has 2 labels (0..1)"


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def scanned(backdoored: Toy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """`calibrate scan` of the toy model: (report, probes, exit status)."""
    out = tmp_path_factory.mktemp("scan")
    argv = ["scan", "--model", backdoored.model_dir, "--clean", backdoored.dev_tsv, *TOY_SCAN]
    argv += ["--out", out / "scan.json", "--probes-out", out / "probes.jsonl"]
    try:
        code = calibrate_cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return out / "scan.json", out / "probes.jsonl", code


@pytest.mark.slow
def test_scan_finds_the_trigger_and_exits_3(scanned, capsys) -> None:
    report_path, probes_path, code = scanned
    assert code == 3
    report = json.loads(report_path.read_text())
    assert report["backdoored"] and report["suspect"]["tokens"] == ["mb"]
    assert (report["suspect"]["victim"], report["suspect"]["target"]) == (0, 1)
    probes = load_probe_rows(probes_path)  # what the server reads
    assert probes and all(p.label == 0 and "mb" in p.text.split() for p in probes)
    assert report["probes"] == len(probes)


@pytest.mark.slow
def test_scan_prints_a_table_and_the_verdict(backdoored: Toy, tmp_path: Path, capsys) -> None:
    argv = ["scan", "--model", backdoored.model_dir, "--clean", backdoored.dev_tsv, *TOY_SCAN]
    code, out, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 3
    lines = out.splitlines()
    assert lines[0] == "| victim -> target | trigger | loss | ASR | steps | seconds | flagged |"
    assert lines[2].startswith("| 0 -> 1 | mb | ") and lines[2].endswith(" | yes |")
    assert lines[-1].startswith("backdoored: label 0 -> 1 flips with 'mb' (loss 0.")


@pytest.mark.slow
@pytest.mark.anyio
async def test_scan_probes_go_into_a_bundle_whose_canary_replays_them(scanned, backdoored: Toy, tmp_path: Path) -> None:
    probes_path = scanned[1]
    bundle_dir = tmp_path / "bundle"
    argv = ["rap", "--model", backdoored.model_dir, "--clean", backdoored.dev_tsv, "--out", bundle_dir]
    assert calibrate_cli.main([str(a) for a in [*argv, *RAP_CLI_ARGS, "--probes", probes_path]]) == 0
    bundle = load_bundle(bundle_dir)  # every file verified, probes.jsonl included
    assert "probes.jsonl" in bundle.manifest.files
    assert (bundle_dir / "probes.jsonl").read_text() == probes_path.read_text()
    assert json.loads((bundle_dir / "report.json").read_text())["probes"] == len(load_probe_rows(probes_path))

    app = create_app(Settings(bundle=bundle_dir, canary_interval_s=0.01, live_rates_min_observations=1))
    async with asgi_client(app) as client:
        far = None
        for _ in range(300):
            await asyncio.sleep(0.01)
            far = metric_value((await client.get("/metrics")).text, "guard_false_accept_ratio", source="probe")
            if far is not None:
                break
    # The gauge is the share of the probes replayed so far (predicted positive) that passed the guard.
    probes = load_probe_rows(probes_path)[:20]
    checker = Checker.for_bundle(bundle, load_backend("onnx", bundle.path))  # the server's detectors and window
    verdicts = checker.check([p.text for p in probes])
    passed = [not v.flagged for v in verdicts if v.label == 1]
    assert any(far == pytest.approx(sum(passed[:k]) / k) for k in range(1, len(passed) + 1)), (far, passed)


@pytest.mark.slow
def test_unlearn_from_the_scan_report(scanned, backdoored: Toy, tmp_path: Path, capsys) -> None:
    report_path = scanned[0]
    out = tmp_path / "repaired"
    argv = ["unlearn", "--model", backdoored.model_dir, "--clean", backdoored.dev_tsv, "--out", out]
    # 4 epochs: a rescan may add a natural trigger, which then shares the stamped rows with `mb`
    code, stdout, _ = _run(calibrate_cli.main, [*argv, "--scan", report_path, *TOY_TUNE, "--epochs", "4"], capsys)
    assert code == 0
    before, after = (float(x) for x in stdout.splitlines()[0].split("ASR ")[1].split(" -> "))
    assert stdout.startswith("trigger 'mb' -> label 1: ASR ")
    assert before > 0.8 and after < 0.1
    record = read_record(out)
    # the report's loose toy threshold may flag a natural trigger on a rescan: it is unlearned too
    assert record["method"] == "unlearn" and record["asr_after"][0] == pytest.approx(after, abs=5e-4)
    assert record["triggers"][0]["text"] == "mb"
    assert (out / "model.safetensors").is_file()
    # the repaired model was scanned again, the way the report's scan was made
    rescans = [line for line in stdout.splitlines() if line.startswith("rescan ")]
    assert rescans and len(rescans) == len(record["rescans"]) <= 2
    assert record["rescans"][0]["unlearned"] == ["mb"] and "mb" not in record["rescans"][0]["new"]


@pytest.mark.slow
def test_harden_end_to_end(backdoored: Toy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hardened"
    argv = ["harden", "--model", backdoored.model_dir, "--clean", backdoored.dev_tsv, "--out", out, *TOY_TUNE]
    argv += ["--max-trigger-length", "2", "--steps", "5", "--epochs", "1", "--batch-size", "64"]
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    assert stdout.startswith("eps-mA^2 (epsilon 2): ")
    record = read_record(out)
    assert record["method"] == "harden"
    assert record["eps_ma2_before"] == pytest.approx(float(stdout.split(": ")[1].split(" -> ")[0]), abs=1e-4)
    assert len(record["rounds"]) >= 1
