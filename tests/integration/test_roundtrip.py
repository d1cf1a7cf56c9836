"""Train -> calibrate -> load -> evaluate on the tiny backdoored model (tests/toy_backdoor.py).

The round trip checks the bundle's contract exactly (files, hashes, threshold
tables). How well the guard works on this toy is asserted only as far as it holds
for every seed that calibrates (see test_the_guard_catches_part_of_the_attack).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from calibrate.demo_corpus import make_corpus
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.evaluate import COLUMNS, Evaluation, evaluate_bundle, write_evaluation
from calibrate.rap.options import FRR_TARGETS, CalibrateOptions, RapOptions
from guard.core import rap
from guard.core.backends import load_backend
from guard.core.backends.base import PARITY_TOLERANCE
from guard.core.bundle import MANIFEST, load_bundle, sha256_file
from guard.core.detection import Detection
from guard.core.errors import InputError
from guard.core.thresholds import PERCENTILE_GRID
from tests.toy_backdoor import CALIBRATE_OPTIONS, RAP_OPTIONS, Toy

FRR_KEYS = [f"{frr:g}" for frr in FRR_TARGETS]  # "0.005", "0.01", "0.03", "0.05"
BUNDLE_FILES = (
    "model.onnx",
    "tokenizer.json",
    "report.json",
    "deltas.png",
    "canaries.jsonl",
)
HF_FILES = ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json")  # only with keep_hf
CLEAN = make_corpus(100, random.Random(1))


@pytest.fixture(scope="module")
def evaluation(backdoored: Toy) -> Evaluation:
    return evaluate_bundle(backdoored.bundle_dir, backdoored.test, {"mb": backdoored.poisoned})


def _rows(evaluation: Evaluation) -> dict[float, dict]:
    return {row["frr_target"]: row for row in evaluation.rows}


# ------------------------------------------------------------------ the bundle


@pytest.mark.slow
def test_bundle_loads_with_every_file_verified(backdoored: Toy) -> None:
    bundle = load_bundle(backdoored.bundle_dir)
    files = bundle.manifest.files
    for name in BUNDLE_FILES:
        assert (backdoored.bundle_dir / name).is_file(), name
        assert files[name] == sha256_file(backdoored.bundle_dir / name), name
    on_disk = {p.relative_to(backdoored.bundle_dir).as_posix() for p in backdoored.bundle_dir.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {MANIFEST}
    assert not (backdoored.bundle_dir / "hf").exists()  # a serving bundle: no HF weights by default
    # world-readable: the serving image runs as uid 10001, whoever calibrated
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in [backdoored.bundle_dir, *backdoored.bundle_dir.rglob("*")])
    # staged next to the bundle and renamed into place: nothing left behind
    assert [p.name for p in backdoored.bundle_dir.parent.iterdir() if "partial" in p.name] == []


@pytest.mark.slow
def test_manifest_describes_the_model_and_the_rap_token(backdoored: Toy) -> None:
    m = load_bundle(backdoored.bundle_dir).manifest
    assert m.model.source == str(backdoored.model_dir.resolve())
    assert m.model.source_sha256 == sha256_file(backdoored.model_dir / "model.safetensors")
    assert m.model.labels == ["LABEL_0", "LABEL_1"]
    assert m.model.max_length == CALIBRATE_OPTIONS.max_length
    assert (m.rap.token_id, m.rap.init_word, m.rap.position) == (30522, "rq", "end")  # the default: before [SEP]
    assert m.rap.init_norm > 0 and m.rap.final_norm > 0
    assert m.default_frr == 0.01
    assert [p.label for p in m.protect] == list(RAP_OPTIONS.protect_labels) == [1]
    # the default statistic, with the floor it is measured from (hashed with the manifest)
    assert m.statistic == rap.DEFAULT_STATISTIC == "floored"
    (protected,) = m.protect
    assert protected.floor is not None and np.isfinite(protected.floor)
    assert Detection.of(load_bundle(backdoored.bundle_dir)).floors == {1: protected.floor}


@pytest.mark.slow
def test_thresholds_are_the_held_out_percentiles(backdoored: Toy) -> None:
    bundle = load_bundle(backdoored.bundle_dir)
    (protected,) = bundle.manifest.protect
    assert list(protected.thresholds) == FRR_KEYS
    assert len(protected.percentiles) == len(PERCENTILE_GRID)
    rap_only = Detection.of(bundle, ("rap",))
    for frr, key in zip(FRR_TARGETS, FRR_KEYS, strict=True):
        # the threshold at FRR f flags a share f of the clean held-out scores, stored twice
        assert protected.thresholds[key] == pytest.approx(protected.percentiles[f"{frr * 100:g}"], abs=1e-12)
        assert rap_only.thresholds(frr)[1].rap == protected.thresholds[key]
    values = [protected.thresholds[k] for k in FRR_KEYS]
    assert values == sorted(values, reverse=True)  # flag-above scores: a larger FRR target, a lower threshold
    # calibration_rows: the held-out half of dev that the model predicts as the protected label
    assert 50 <= protected.calibration_rows <= len(backdoored.dev) // 2


@pytest.mark.slow
def test_report_and_canaries(backdoored: Toy) -> None:
    report = json.loads((backdoored.bundle_dir / "report.json").read_text())
    assert report["rap_token"]["token_id"] == 30522
    assert 1 <= len(report["attempts"]) <= len(RAP_OPTIONS.ladder)
    assert report["onnx_parity_max_prob_diff"] <= 1e-4
    assert {"load", "rap", "export"} <= set(report["seconds"])
    assert list(report["labels"]["LABEL_1"]["thresholds"]) == FRR_KEYS
    canaries = [json.loads(line) for line in (backdoored.bundle_dir / "canaries.jsonl").read_text().splitlines()]
    dev = {(e.text, e.label) for e in backdoored.dev}
    assert 0 < len(canaries) <= CALIBRATE_OPTIONS.canaries
    assert all((c["text"], c["label"]) in dev for c in canaries)
    assert (backdoored.bundle_dir / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ evaluation


@pytest.mark.slow
def test_evaluation_rows(evaluation: Evaluation, backdoored: Toy) -> None:
    rows = _rows(evaluation)
    assert sorted(rows) == sorted(FRR_TARGETS)
    for row in evaluation.rows:
        assert list(row) == COLUMNS
        assert row["attack"] == "mb"
        assert row["poisoned_rows"] == len(backdoored.poisoned)  # all of them are negatives
        for key in ("cacc", "asr", "test_frr", "test_far", "residual_asr"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["residual_asr"] == pytest.approx(row["asr"] * row["test_far"])
    assert evaluation.target == 1
    assert len(evaluation.clean.labels) == len(backdoored.test)


@pytest.mark.slow
def test_a_larger_frr_target_flags_more(evaluation: Evaluation) -> None:
    rows = [_rows(evaluation)[frr] for frr in sorted(FRR_TARGETS)]
    frr = [r["test_frr"] for r in rows]
    far = [r["test_far"] for r in rows]
    assert frr == sorted(frr)
    assert far == sorted(far, reverse=True)


@pytest.mark.slow
def test_the_guard_catches_part_of_the_attack(evaluation: Evaluation) -> None:
    """What holds on this toy for every seed that calibrates, not just this one.

    Over the 5 of 6 seeds that calibrate: CACC >= 0.99 and ASR >= 0.71; at the 5%
    FRR target the test FRR stayed <= 0.12 and the test FAR ranged 0.12-0.68 (0.12
    for this seed). So "FAR <= 0.2" would hold for this seed only; asserted instead:
    the backdoor works, and the guard stops a real share of it (FAR well below the
    ~0.95 of a guard that cannot tell triggered inputs from clean ones at 5% FRR).
    """
    at5 = _rows(evaluation)[0.05]
    assert at5["cacc"] >= 0.95
    assert at5["asr"] >= 0.6
    assert at5["test_frr"] <= 0.2
    assert at5["test_far"] <= 0.75
    assert at5["residual_asr"] < at5["asr"]


@pytest.mark.slow
def test_write_evaluation(evaluation: Evaluation, tmp_path: Path) -> None:
    written = write_evaluation(evaluation, tmp_path / "eval")
    names = ["evaluation.json", "evaluation.md", "far_frr.png", "deltas.png"]
    assert written == [tmp_path / "eval" / n for n in names]
    summary = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert summary["rows"] == evaluation.rows
    assert summary["target"] == 1 and summary["backend"] == "onnx"
    markdown = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    assert markdown.count("| mb |") == len(FRR_TARGETS) * 3  # rap, features, rap+features
    for name in ("far_frr.png", "deltas.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_scores_separate_triggered_from_clean_inputs(evaluation: Evaluation) -> None:
    # RAP's premise: the perturbation moves triggered inputs less than clean ones, so they score higher
    clean = evaluation.clean.rap_scores(1)
    triggered = evaluation.attacks["mb"].rap_scores(1)
    assert len(clean) and len(triggered)
    assert np.median(triggered) > np.median(clean)


# ------------------------------------------------------------------ --force and failures


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def _bad_label_options(force: bool) -> CalibrateOptions:
    """Fails inside the staged build (learn_rap), after the staging folder exists."""
    return CalibrateOptions(rap=RapOptions(protect_labels=(5,), progress=False), max_length=32, force=force)


def test_non_empty_out_dir_needs_force(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(out)
    with pytest.raises(InputError, match="already exists and is not empty; pass --force"):
        calibrate_bundle(tiny_model_dir, [], out, CALIBRATE_OPTIONS)
    assert _tree(out) == before
    assert _leftovers(tmp_path) == []


def test_out_path_that_is_a_file_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.write_text("not a directory")
    with pytest.raises(InputError, match="exists and is not a directory"):
        calibrate_bundle(tiny_model_dir, [], out, CALIBRATE_OPTIONS)
    assert out.read_text() == "not a directory"


def test_empty_out_dir_needs_no_force(tiny_model_dir: Path, tmp_path: Path) -> None:
    # an empty folder passes the --force check; the bad label fails later, in learn_rap
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(InputError, match="protect label 5 does not exist"):
        calibrate_bundle(tiny_model_dir, CLEAN, out, _bad_label_options(force=False))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_failed_calibration_leaves_no_partial_bundle(tiny_model_dir: Path, tmp_path: Path, force: bool) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(InputError, match="protect label 5 does not exist"):
        calibrate_bundle(tiny_model_dir, CLEAN, out, _bad_label_options(force))
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_failed_forced_calibration_keeps_the_old_bundle(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"the": "previous bundle"}')
    before = _tree(out)
    with pytest.raises(InputError, match="protect label 5 does not exist"):
        calibrate_bundle(tiny_model_dir, CLEAN, out, _bad_label_options(force=True))
    assert _tree(out) == before  # replaced only once the new bundle is complete
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_keep_hf_adds_the_torch_backends_weights(backdoored: Toy, tmp_path: Path) -> None:
    options = dataclasses.replace(CALIBRATE_OPTIONS, keep_hf=True)
    manifest = calibrate_bundle(backdoored.model_dir, backdoored.dev, tmp_path / "bundle", options)
    for name in HF_FILES:
        assert manifest.files[name] == sha256_file(tmp_path / "bundle" / name), name
        assert (tmp_path / "bundle" / name).stat().st_mode & 0o444 == 0o444, name  # safetensors writes 0600
    bundle = load_bundle(tmp_path / "bundle")
    batch = bundle.tokenizer().encode([r.text for r in backdoored.test[:8]])
    onnx, torch_ = load_backend("onnx", bundle.path, threads=1), load_backend("torch", bundle.path)
    try:
        assert np.abs(rap.softmax(onnx.infer(batch)) - rap.softmax(torch_.infer(batch))).max() <= PARITY_TOLERANCE
    finally:
        onnx.close()
        torch_.close()


@pytest.mark.slow
def test_copy_of_the_bundle_still_loads(backdoored: Toy, tmp_path: Path) -> None:
    # file hashes are relative to the bundle: it can be moved
    copy = shutil.copytree(backdoored.bundle_dir, tmp_path / "moved")
    assert load_bundle(copy).manifest == load_bundle(backdoored.bundle_dir).manifest
