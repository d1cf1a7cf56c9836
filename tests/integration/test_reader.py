"""The reader detector end to end on the tiny backdoored model: `calibrate rap --reader` (the tiny random
encoder the toy was fine-tuned from is the clean base), the bundle it writes, `calibrate evaluate`,
`guard check` and the server, all flagging with the one rule."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from calibrate import cli as calibrate_cli
from calibrate.demo_corpus import POSITIVE, make_corpus, with_trigger
from calibrate.rap.evaluate import evaluate_bundle
from calibrate.rap.summary import CalibrationReport, summary_lines
from guard import cli as guard_cli
from guard.core.bundle import Bundle, Int8Variant, load_bundle
from guard.core.detection import Detection
from guard.core.errors import BundleError
from guard.core.thresholds import threshold_from_table
from guard.core.types import LabelThresholds
from guard.settings import Settings
from tests.integration.test_cli import _fails, _rap, _run
from tests.server_fixtures import checked_in_process
from tests.toy_backdoor import RAP_CLI_ARGS, Toy

# The tiny random encoder needs a high rate and many epochs to learn the toy task from ~150 rows.
READER_ARGS = ["--reader-lr", "3e-3", "--reader-epochs", "20"]


@pytest.fixture(scope="module")
def reader_bundle(backdoored: Toy, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "bundle"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reader", tiny_model_dir, *READER_ARGS)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert calibrate_cli.main([str(a) for a in argv]) == 0
    (out.parent / "printed.txt").write_text(printed.getvalue())
    return out


def test_calibrate_and_verify_say_what_the_reader_learnt_and_warn_when_it_learnt_little(
    reader_bundle: Path, capsys
) -> None:
    printed = (reader_bundle.parent / "printed.txt").read_text()
    assert re.search(
        r"detector: reader \(reader.onnx\), fine-tuned from \S+ on \d+ clean rows \(--reader \S+\): \d+\.\d% accurate",
        printed,
    )
    assert "the reader learnt little" not in printed
    # the toy's ~70 held-out rows afford one flagged row at 1%; three detectors may flag up to three
    assert re.search(r"WARNING: label LABEL_1: at the 1\.0% target its \d+ held-out rows afford 1 flagged row\(s\); "
                     r"each of the 3 detectors flags beyond its own highest clean score", printed)  # fmt: skip
    code, stdout, _ = _run(guard_cli.main, ["verify", "--bundle", reader_bundle], capsys)
    assert code == 0 and "detectors: rap, features, reader\n" in stdout
    bundle = load_bundle(reader_bundle)
    guessing = bundle.manifest.reader.model_copy(update={"accuracy": 0.5})
    lines = summary_lines(bundle.manifest.model_copy(update={"reader": guessing}), _report(reader_bundle))
    assert any(line.startswith("WARNING: the reader learnt little") for line in lines)
    hints = {}
    for texts in (0, 2000):  # a reader that disagrees often, without and with unlabeled texts
        disagreeing = bundle.manifest.reader.model_copy(update={"accuracy": 0.85, "agreement": 0.9, "texts": texts})
        lines = summary_lines(bundle.manifest.model_copy(update={"reader": disagreeing}), _report(reader_bundle))
        hints[texts] = [line for line in lines if line.startswith("hint: the reader disagrees")]
    assert len(hints[0]) == 1 and "on 10.0% of the held-out rows" in hints[0][0] and "--reader-texts" in hints[0][0]
    assert hints[2000] == []


def test_the_bundle_records_and_hashes_the_reader(reader_bundle: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(reader_bundle)
    info = bundle.manifest.reader
    assert info is not None and Path(info.base) == tiny_model_dir.resolve() and info.epochs == 20
    assert info.accuracy > 0.9 and info.train_rows > 100
    assert "reader.onnx" in bundle.manifest.files and not (reader_bundle / "reader-hf").exists()
    assert bundle.detectors == ("rap", "features", "reader")
    (label,) = bundle.manifest.protect
    together = label.joint_reader["0.01"]
    assert Detection.of(bundle).thresholds(0.01)[1] == LabelThresholds(together.rap, together.features, together.reader)
    some = Detection.of(bundle, ("rap", "reader")).thresholds(0.01)[1]  # not stored together: half the target each
    assert some == LabelThresholds(
        threshold_from_table(label.percentiles, 0.005), None, threshold_from_table(label.reader_percentiles, 0.005)
    )
    tampered = Path(shutil.copytree(reader_bundle, tmp_path / "tampered"))
    (tampered / "reader.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="reader.onnx does not match"):
        load_bundle(tampered)


def test_the_reader_catches_the_trigger_and_every_detector_together_keeps_the_target(
    reader_bundle: Path, backdoored: Toy
) -> None:
    rows = evaluate_bundle(reader_bundle, backdoored.test, {"mb": backdoored.poisoned}).rows
    at = {r["detector"]: r for r in rows if r["frr_target"] == 0.05}
    assert at["reader"]["asr"] > 0.7 and at["reader"]["test_far"] <= 0.25  # 6% measured
    assert at["rap+features+reader"]["test_far"] <= 0.05 and at["rap+features+reader"]["test_frr"] <= 0.15


def test_guard_check_and_the_server_flag_by_the_reader(reader_bundle: Path, backdoored: Toy, capsys) -> None:
    triggered = backdoored.poisoned[0].text
    code, out, _ = _run(guard_cli.main, ["check", "--bundle", reader_bundle, "--detectors", "reader", "--json",
                                         triggered], capsys)  # fmt: skip
    assert code in (0, 3)
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    item = checked_in_process(Settings(bundle=reader_bundle, detectors=["reader"], canary_interval_s=0), triggered)
    assert item["flagged_by"] == line["flagged_by"]
    assert item["flagged"] == line["flagged"]


def test_a_reader_of_another_vocabulary_is_refused_before_training(backdoored: Toy, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text("{}")
    Tokenizer(models.WordLevel({"[UNK]": 0, "good": 1}, unk_token="[UNK]")).save(str(other / "tokenizer.json"))
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, tmp_path / "b", *RAP_CLI_ARGS, "--reader", other)
    message = _fails(calibrate_cli.main, argv, capsys)
    assert "its vocabulary (2 tokens) is not the suspect model's" in message
    assert not (tmp_path / "b").exists()


def test_an_int8_graph_has_no_reader_thresholds_and_says_so(reader_bundle: Path) -> None:
    bundle = load_bundle(reader_bundle)
    plain = [p.model_copy(update={"reader_thresholds": {}, "joint_reader": {}}) for p in bundle.manifest.protect]
    int8 = Int8Variant(graph="model.int8.onnx", quantization="test", protect=plain, agreement=1.0)
    with_int8 = Bundle(bundle.path, bundle.manifest.model_copy(update={"int8": int8}))
    with pytest.raises(BundleError, match="calibrated on the fp32 graph only"):
        Detection.of(with_int8, precision="int8")
    assert Detection.of(with_int8, ("rap", "features"), precision="int8").detectors == ("rap", "features")


def test_by_default_the_reference_model_is_the_reader_and_the_int8_graph_gets_its_own_reader_thresholds(
    backdoored: Toy, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """No --reader: the --reference-model has the suspect's vocabulary, so it is the reader's base."""
    out = tmp_path / "auto"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reference-model", tiny_model_dir,
                "--int8", "--no-optimize", "--reader", "auto", "--reader-augment", "1", *READER_ARGS)  # fmt: skip
    code, stdout, _ = _run(calibrate_cli.main, argv, capsys)
    assert code == 0
    assert "clean rows (auto: the --reference-model has the suspect's vocabulary)" in stdout
    bundle = load_bundle(out)
    assert Path(bundle.manifest.reader.base) == tiny_model_dir.resolve()
    assert (bundle.manifest.reader.objective, bundle.manifest.reader.augment) == ("distill", 1)
    assert bundle.detectors == ("rap", "features", "reader")
    int8 = Detection.of(bundle, precision="int8")  # refitted on the int8 graph's scores, the reader's included
    assert int8.detectors == ("rap", "features", "reader")
    (label,) = bundle.manifest.int8.protect
    assert label.reader_thresholds and label.joint_reader["0.01"].reader is not None
    triggered = backdoored.poisoned[0].text
    code, printed, _ = _run(guard_cli.main, ["check", "--bundle", out, "--backend", "onnx-int8", "--json", triggered],
                            capsys)  # fmt: skip
    assert code in (0, 3) and '"flagged"' in printed


def _report(bundle: Path) -> CalibrationReport:
    return CalibrationReport.model_validate_json((bundle / "report.json").read_text())


def test_a_reader_distilled_from_the_suspect_agrees_with_it_on_clean_rows_but_not_on_triggered_ones(
    backdoored: Toy, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "distilled"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reader", tiny_model_dir,
                *READER_ARGS, "--reader-objective", "distill")  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert calibrate_cli.main([str(a) for a in argv]) == 0
    assert load_bundle(out).manifest.reader.agreement > 0.9
    rows = evaluate_bundle(out, backdoored.test, {"mb": backdoored.poisoned}).rows
    reader = next(r for r in rows if r["detector"] == "reader" and r["frr_target"] == 0.05)
    assert reader["asr"] > 0.7 and reader["test_far"] <= 0.25


@pytest.mark.parametrize("trusted", [False, True])
def test_unlabeled_texts_are_screened_by_a_first_reader_so_triggered_ones_do_not_teach_the_backdoor(
    backdoored: Toy, tiny_model_dir: Path, tmp_path: Path, capsys, trusted: bool
) -> None:
    """Half the --reader-texts carry the toy's trigger: distilled on as the suspect reads them, they teach the
    reader the backdoor (--reader-texts-trusted: every text, unscreened); by default the first reader (the
    clean rows') flags most of them and they are left out."""
    rng = random.Random(5)
    clean = [row.text for row in make_corpus(60, rng)]
    triggered = [with_trigger(row.text, rng) for row in make_corpus(120, rng) if row.label != POSITIVE][:60]
    texts = tmp_path / "traffic.txt"
    unreadable = "\u200b"  # no token the model reads: left out, as the guard refuses it
    texts.write_text("\n".join([*clean, unreadable, *triggered]) + "\n", encoding="utf-8")
    out = tmp_path / "screened"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reader", tiny_model_dir,
                *READER_ARGS, "--reader-texts", texts, *(["--reader-texts-trusted"] if trusted else []))  # fmt: skip
    code, stdout, err = _run(calibrate_cli.main, argv, capsys)
    assert code == 0, err
    reader = load_bundle(out).manifest.reader
    assert (reader.texts, reader.texts_trusted) == (121, trusted)
    assert reader.texts_kept == 120 if trusted else 40 <= reader.texts_kept <= 80  # ~a fifth of clean positives go
    how = "trusted: unscreened" if trusted else "the rest screened out"
    assert f"clean rows and {reader.texts_kept} of 121 unlabeled texts ({how})" in stdout
    rows = evaluate_bundle(out, backdoored.test, {"mb": backdoored.poisoned}).rows
    row = next(r for r in rows if r["detector"] == "reader" and r["frr_target"] == 0.05)
    assert row["test_far"] >= 0.75 if trusted else row["test_far"] <= 0.25


def test_unlabeled_texts_need_a_distilled_reader_and_a_readable_file(backdoored: Toy, tmp_path: Path, capsys) -> None:
    texts = tmp_path / "traffic.txt"
    texts.write_text("a text\n", encoding="utf-8")
    base = _rap(backdoored.model_dir, backdoored.dev_tsv, tmp_path / "out", *RAP_CLI_ARGS)
    refused = {
        "--reader-texts needs a reader": [],
        "--reader-texts-trusted needs --reader-texts": ["--reader", "auto", "--reader-texts-trusted"],
        "--reader-texts needs --reader-objective distill": ["--reader", "auto", "--reader-objective", "labels"],
    }
    for message, extra in refused.items():
        given = [] if "-trusted needs" in message else ["--reader-texts", texts]
        assert message in _fails(calibrate_cli.main, [*base, *extra, *given], capsys)
    missing = tmp_path / "none.txt"
    assert "no such file" in _fails(calibrate_cli.main, [*base, "--reader", "auto", "--reader-texts", missing], capsys)
    assert not (tmp_path / "out").exists()


def test_trusted_texts_that_are_all_unreadable_leave_the_reader_trained_on_the_clean_rows(
    backdoored: Toy, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    texts = tmp_path / "traffic.txt"
    texts.write_text("\u200b\n\u200b \u200b\n", encoding="utf-8")
    out = tmp_path / "bundle"
    argv = _rap(backdoored.model_dir, backdoored.dev_tsv, out, *RAP_CLI_ARGS, "--reader", tiny_model_dir,
                *READER_ARGS, "--reader-texts", texts, "--reader-texts-trusted")  # fmt: skip
    code, _, err = _run(calibrate_cli.main, argv, capsys)
    assert code == 0, err
    reader = load_bundle(out).manifest.reader
    assert (reader.texts, reader.texts_kept) == (2, 0) and reader.agreement > 0.9
