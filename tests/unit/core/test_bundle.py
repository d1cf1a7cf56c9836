"""Bundle save/load/verify (guard.core.bundle) on a hand-built bundle directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from guard.core import thresholds
from guard.core.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
    Manifest,
    ModelInfo,
    ProtectedLabel,
    RapToken,
    load_bundle,
    read_manifest,
    save_bundle,
    sha256_file,
)
from guard.core.detection import Detection
from guard.core.errors import BundleError

# 1001 evenly spaced clean RAP scores: the conformal threshold at FRR q is the
# floor(q * 1002)-th largest, -(floor(q * 1002) - 1) / 1000.
SCORES = np.linspace(-1.0, 0.0, 1001)
STORED = {"0.01": -0.05, "0.05": -0.125}  # deliberately not the table's values


def _manifest(**overrides) -> Manifest:
    fields = {
        "model": ModelInfo(source="tiny-bert", source_sha256="0" * 64, labels=["negative", "positive"], max_length=16),
        "rap": RapToken(token_id=30522, init_word="rq", init_norm=1.0, final_norm=1.5),
        "protect": [
            ProtectedLabel(
                label=1,
                name="positive",
                thresholds=STORED,
                percentiles=thresholds.percentile_table(SCORES),
                calibration_rows=len(SCORES),
            )
        ],
        "calibrated_on": "onnx-fp32",
    }
    return Manifest(**(fields | overrides))


@pytest.fixture()
def bundle_dir(tmp_path: Path, tokenizer_path: Path) -> Path:
    path = tmp_path / "bundle"
    (path / "hf").mkdir(parents=True)
    (path / "model.onnx").write_bytes(b"\x08\x07not-really-onnx" * 64)
    shutil.copy2(tokenizer_path, path / "tokenizer.json")
    (path / "hf" / "config.json").write_text('{"model_type": "bert"}\n')
    save_bundle(path, _manifest())
    return path


def _edit_manifest(path: Path, edit) -> None:
    raw = json.loads((path / MANIFEST).read_text())
    edit(raw)
    (path / MANIFEST).write_text(json.dumps(raw))


def test_save_records_every_file_hash(bundle_dir: Path) -> None:
    manifest = read_manifest(bundle_dir)
    assert set(manifest.files) == {"model.onnx", "tokenizer.json", "hf/config.json"}
    assert manifest.files["model.onnx"] == sha256_file(bundle_dir / "model.onnx")
    assert manifest.schema_version == SCHEMA_VERSION


def test_save_returns_the_written_manifest(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    shutil.copy2(tokenizer_path, tmp_path / "tokenizer.json")
    written = save_bundle(tmp_path, _manifest())
    assert written == read_manifest(tmp_path)


def test_save_refuses_a_manifest_that_would_not_load_back(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    shutil.copy2(tokenizer_path, tmp_path / "tokenizer.json")
    manifest = _manifest()
    label = manifest.protect[0].model_copy(update={"features_thresholds": {"0.005": float("inf")}})
    with pytest.raises(BundleError, match="would not load back"):
        save_bundle(tmp_path, manifest.model_copy(update={"protect": [label]}))
    assert not (tmp_path / MANIFEST).exists()


def test_load_round_trip(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, Bundle)
    assert bundle.protect_labels == [1]
    assert bundle.manifest.model.labels == ["negative", "positive"]
    assert bundle.manifest.rap.token_id == 30522


def _rap_at(bundle: Bundle, frr: float | None = None) -> float:
    return Detection.of(bundle, ["rap"]).thresholds(frr)[1].rap


def test_thresholds_stored_and_interpolated(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert _rap_at(bundle) == -0.05  # default_frr 0.01 is stored
    assert _rap_at(bundle, 0.05) == -0.125
    # 0.02 is not stored: read from the percentile table (on its grid: the conformal threshold)
    assert _rap_at(bundle, 0.02) == pytest.approx(thresholds.threshold_at_frr(SCORES, 0.02), abs=1e-12)
    assert _rap_at(bundle, 0.02) == pytest.approx(-0.019, abs=1e-12)  # floor(0.02 * 1002) = 20th largest
    assert _rap_at(bundle, 0.0333) == pytest.approx(thresholds.threshold_at_frr(SCORES, 0.0333), abs=2e-3)


def test_a_schema_1_bundle_loads_with_its_rap_thresholds_negated(tmp_path: Path) -> None:
    """Schema 1 stored RAP thresholds as deltas flagged below (and "prob" when no statistic was named);
    schema 2 as scores flagged above: the same rows are flagged."""
    from tests.server_fixtures import build_v1_stub_bundle

    raw = json.loads((build_v1_stub_bundle(tmp_path / "v1") / MANIFEST).read_text())
    assert raw["schema_version"] == 1 and "statistic" not in raw
    bundle = load_bundle(tmp_path / "v1")
    assert bundle.manifest.schema_version == SCHEMA_VERSION == 2
    assert bundle.manifest.statistic == "prob"
    (label,) = bundle.manifest.protect
    assert (
        label.thresholds == {k: -v for k, v in raw["protect"][0]["thresholds"].items()} == {"0.01": -0.1, "0.05": -0.2}
    )
    assert label.percentiles == {k: -v for k, v in raw["protect"][0]["percentiles"].items()}


def test_bundle_tokenizer_uses_the_manifest(bundle_dir: Path) -> None:
    tok = load_bundle(bundle_dir).tokenizer()
    assert tok.rap_token_id == 30522
    assert tok.max_length == 16
    assert tok.encode_perturbed(["hello"]).input_ids[0, 1] == 30522


def test_tampered_file_is_refused(bundle_dir: Path) -> None:
    model = bundle_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[10] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx.*sha256"):
        load_bundle(bundle_dir)


def test_tampered_nested_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "hf" / "config.json").write_text('{"model_type": "bert", "x": 1}\n')
    with pytest.raises(BundleError, match=r"hf/config\.json"):
        load_bundle(bundle_dir)


def test_deleted_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "hf" / "config.json").unlink()
    with pytest.raises(BundleError, match=r"hf/config\.json is missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("version", [0, 3, "2", None])
def test_wrong_schema_version_is_refused(bundle_dir: Path, version: object) -> None:
    _edit_manifest(bundle_dir, lambda raw: raw.__setitem__("schema_version", version))
    with pytest.raises(BundleError, match="schema_version"):
        load_bundle(bundle_dir)


def test_missing_schema_version_is_refused(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda raw: raw.pop("schema_version"))
    with pytest.raises(BundleError, match="schema_version None"):
        load_bundle(bundle_dir)


def test_missing_manifest_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST).unlink()
    with pytest.raises(BundleError, match="not a guard bundle"):
        load_bundle(bundle_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '"a string"'])
def test_invalid_json_is_refused(bundle_dir: Path, text: str) -> None:
    (bundle_dir / MANIFEST).write_text(text)
    with pytest.raises(BundleError):
        load_bundle(bundle_dir)


def test_invalid_field_is_named(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda raw: raw["rap"].__setitem__("token_id", "not-an-int"))
    with pytest.raises(BundleError, match=r"invalid field rap\.token_id"):
        load_bundle(bundle_dir)


def test_manifest_without_required_file_is_refused(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda raw: raw["files"].pop("model.onnx"))
    with pytest.raises(BundleError, match=r"lists no model\.onnx"):
        load_bundle(bundle_dir)


def test_bundle_without_protect_label_is_refused(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda raw: raw.__setitem__("protect", []))
    with pytest.raises(BundleError, match="protects no label"):
        load_bundle(bundle_dir)


def test_save_refuses_a_bundle_without_required_files(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"missing tokenizer\.json"):
        save_bundle(tmp_path, _manifest())
    assert not (tmp_path / MANIFEST).exists()


def test_a_bundle_without_the_feature_detector_serves_rap_alone(bundle_dir: Path) -> None:
    """Bundles from before the feature detector load unchanged; asking for it says how to rebuild."""
    from guard.core.types import LabelThresholds

    bundle = load_bundle(bundle_dir)
    assert bundle.detectors == ("rap",)
    assert Detection.of(bundle, ["rap"]).thresholds() == {1: LabelThresholds(-0.05, None)}
    with pytest.raises(BundleError, match="no features detector; rebuild it with `calibrate rap`"):
        Detection.of(bundle, ["rap", "features"])
    with pytest.raises(BundleError, match="has no feature detector"):
        bundle.feature_stats()


def test_joint_and_feature_thresholds_are_read_per_target(tmp_path: Path, tokenizer_path: Path) -> None:
    from guard.core import features
    from guard.core.bundle import FeatureDetector, JointThreshold
    from guard.core.types import LabelThresholds

    scores = np.linspace(-3.0, 3.0, 1001)
    label = ProtectedLabel(
        label=1,
        name="positive",
        thresholds=STORED,
        percentiles=thresholds.percentile_table(SCORES),
        calibration_rows=len(SCORES),
        features_thresholds={"0.01": 2.5},
        features_percentiles=thresholds.percentile_table(scores),
        joint={"0.01": JointThreshold(rap=-0.004, features=2.9)},
    )
    (tmp_path / "model.onnx").write_bytes(b"x")
    shutil.copy2(tokenizer_path, tmp_path / "tokenizer.json")
    rng = np.random.default_rng(0)
    x, predicted = rng.normal(size=(50, 2, 4)), np.ones(50, int)
    features.standardise(features.fit(x, predicted, [1]), x, predicted).save(tmp_path / features.FEATURES_FILE)
    detector = FeatureDetector(layers=2, hidden=4, shrinkage=0.5, fit_rows=50)
    save_bundle(tmp_path, _manifest(protect=[label], features=detector))
    bundle = load_bundle(tmp_path)
    assert bundle.detectors == ("rap", "features")
    assert bundle.feature_stats().layers == 2
    assert Detection.of(bundle, ["rap", "features"]).thresholds() == {1: LabelThresholds(-0.004, 2.9)}  # stored pair
    assert Detection.of(bundle, ["features"]).thresholds() == {1: LabelThresholds(None, 2.5)}
    assert Detection.of(bundle, ["rap"]).thresholds(0.05) == {1: LabelThresholds(-0.125, None)}
    # a target not stored: each detector at half of it, from its own table
    pair = Detection.of(bundle, ["features", "rap"]).thresholds(0.02)[1]
    assert pair.rap == pytest.approx(thresholds.threshold_at_frr(SCORES, 0.01))
    assert pair.features == pytest.approx(thresholds.threshold_at_frr(scores, 0.01))


def test_the_rap_position_is_read_from_the_manifest_and_older_bundles_are_front(tmp_path: Path, bundle_dir) -> None:
    # a bundle written before the choice: no `position` in its manifest, pass 2 as it was calibrated (front)
    _edit_manifest(bundle_dir, lambda raw: raw["rap"].pop("position", None))
    old = load_bundle(bundle_dir)
    assert old.manifest.rap.position == "front" and old.tokenizer().rap_position == "front"
    (row,) = old.tokenizer().perturbed_ids(["hello world"])
    assert row[1] == 30522

    end_dir = tmp_path / "end"
    end_dir.mkdir()
    shutil.copy2(bundle_dir / "tokenizer.json", end_dir / "tokenizer.json")
    (end_dir / "model.onnx").write_bytes(b"x")
    save_bundle(end_dir, _manifest(rap=RapToken(token_id=30522, init_word="rq", init_norm=1.0, final_norm=1.5,
                                                position="end")))  # fmt: skip
    (row,) = load_bundle(end_dir).tokenizer().perturbed_ids(["hello world"])
    assert row[-2:] == [30522, 102]


def test_an_unknown_rap_position_is_refused_at_load(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda raw: raw["rap"].update(position="middle"))
    with pytest.raises(BundleError):
        load_bundle(bundle_dir)
