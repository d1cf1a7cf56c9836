"""The guard bundle: a directory the calibrator writes and the server loads.

Layout::

    manifest.json   this schema: provenance, RAP token, thresholds, file hashes
    model.onnx      inference graph (pass 1 and pass 2 share it)
    model.opt.onnx  optional: the same graph with ONNX Runtime's transformer fusions (served when present)
    model.int8.onnx, model.int8.opt.onnx   optional int8 graphs, each with thresholds of its own
    tokenizer.json  fast tokenizer
    hf/             optional: HF model dir with the RAP row appended (torch backend; `calibrate rap --keep-hf`)
    features.npz    optional: the feature detector's statistics (guard.core.features)
    reader.onnx     optional: the reader detector's clean classifier (guard.core.reader; `calibrate rap --reader`)
    report.json     calibration report; deltas.png its picture
    canaries.jsonl  held-out clean rows (live FRR probes)
    probes.jsonl    optional known-trigger rows, original labels (live FAR probes; `calibrate rap --probes`)

`load_bundle` refuses a bundle whose files do not match their recorded sha256.
Schema 2 stores every threshold as a score flagged ABOVE it (guard.core.detection);
schema 1 stored RAP's as a delta flagged below, and is converted on load (`upgrade_v1`).
`save_bundle` leaves every file world-readable: the serving image runs as uid 10001,
whoever wrote the bundle (safetensors writes its weights 0600).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from guard.core.errors import BundleError
from guard.core.family import RapPosition
from guard.core.features import FEATURES_FILE, FeatureStats
from guard.core.tokenizer import RapTokenizer, SpecialTokens

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.onnx", "tokenizer.json")
READER_GRAPH = "reader.onnx"
READABLE_FILE, READABLE_DIR = 0o644, 0o755


class ModelInfo(BaseModel):
    source: str = Field(description="where the suspect model was loaded from")
    source_sha256: str = Field(description="sha256 of the source weights file")
    labels: list[str] = Field(description="label names by id")
    max_length: int = Field(description="tokens per input, [CLS] and [SEP] included")
    classifier_max_length: int | None = Field(
        None,
        description="tokens the protected classifier reads, [CLS] and [SEP] included (None: max_length); "
        "text beyond the guard's window is checked in windows",
    )


class RapToken(BaseModel):
    token_id: int = Field(description="the appended embedding row (= original vocab size)")
    init_word: str = Field(description="word whose embedding initialised the row")
    init_norm: float
    final_norm: float
    position: RapPosition = Field(
        "front",
        description="where pass 2 inserts the row: right after the first special token (front) or right before "
        "the trailing ones (end); bundles older than the choice are front",
    )


class JointThreshold(BaseModel):
    """The detectors' thresholds for one FRR target, chosen together (guard.core.thresholds.union)."""

    rap: float = Field(description="flag when the RAP score is above this")
    features: float | None = Field(None, description="flag when the feature score is above this")
    reader: float | None = Field(None, description="flag when the reader score is above this")
    switch: float | None = Field(None, description="flag when the switch score is above this")


class ProtectedLabel(BaseModel):
    label: int
    name: str
    thresholds: dict[str, float] = Field(
        description="FRR target (as text) -> RAP score threshold, flagged above (RAP alone)"
    )
    percentiles: dict[str, float] = Field(description="RAP threshold at each FRR of the grid (percent, as text)")
    calibration_rows: int = Field(description="held-out rows the thresholds were fitted on")
    floor: float | None = Field(
        None, description="the floored statistic's log-odds floor (guard.core.rap.floor), from clean training rows"
    )
    features_thresholds: dict[str, float] = Field(
        default_factory=dict, description="FRR target -> feature score threshold (the feature detector alone)"
    )
    features_percentiles: dict[str, float] = Field(
        default_factory=dict, description="feature score threshold at each FRR of the grid"
    )
    joint: dict[str, JointThreshold] = Field(
        default_factory=dict, description="FRR target -> both thresholds when RAP and the features run"
    )
    reader_thresholds: dict[str, float] = Field(
        default_factory=dict, description="FRR target -> reader score threshold (the reader detector alone)"
    )
    reader_percentiles: dict[str, float] = Field(
        default_factory=dict, description="reader score threshold at each FRR of the grid"
    )
    switch_thresholds: dict[str, float] = Field(
        default_factory=dict, description="FRR target -> switch score threshold (the switch detector alone)"
    )
    switch_percentiles: dict[str, float] = Field(
        default_factory=dict, description="switch score threshold at each FRR of the grid"
    )
    joint_reader: dict[str, JointThreshold] = Field(
        default_factory=dict,
        description="FRR target -> every detector's threshold when all of them run (a bundle with a reader or "
        "a switch detector)",
    )


class FeatureDetector(BaseModel):
    """The one-pass feature detector (guard.core.features): its statistics file and how it was fitted."""

    file: str = Field(FEATURES_FILE, description="the statistics (npz) in the bundle")
    method: str = Field("dan", description="per-layer Mahalanobis distance to the predicted label's clean mean")
    layers: int
    hidden: int
    shrinkage: float
    fit_rows: int = Field(description="clean rows the means and covariance were fitted on")


class ReaderDetector(BaseModel):
    """The reader detector (guard.core.reader): a clean classifier trained at calibration, and how."""

    graph: str = Field(READER_GRAPH, description="the reader's ONNX graph in the bundle")
    base: str = Field(description="the clean pre-trained checkpoint it was fine-tuned from")
    base_sha256: str = Field(description="sha256 of the base's weights file")
    train_rows: int = Field(description="clean rows it was fine-tuned on (the RAP row's training half)")
    epochs: int
    objective: str = Field("distill", description="what it learnt: the suspect's probabilities, or the labels")
    augment: int = Field(0, description="perturbed copies of each training row it was also distilled on")
    texts: int = Field(0, description="unlabeled texts given (--reader-texts)")
    texts_kept: int = Field(0, description="of them, those it was also distilled on: the rest a first reader flagged")
    texts_trusted: bool = Field(False, description="the texts were distilled on unscreened (--reader-texts-trusted)")
    accuracy: float = Field(description="its accuracy on the held-out clean rows, every label")
    agreement: float = Field(description="share of held-out rows it predicts as the suspect model does")


class SwitchDetector(BaseModel):
    """The switch detector (guard.core.switch): the untrained vocabulary word its pass inserts."""

    token_id: int = Field(description="the word's id, inserted where pass 2 puts the RAP row")
    word: str = Field(description="the RAP row's init word, whose untrained embedding it is")


class Int8Variant(BaseModel):
    """A quantized graph with thresholds fitted on ITS OWN deltas (int8 moves them)."""

    graph: str = Field(description="file name of the int8 ONNX graph")
    quantization: str = Field(description="how it was quantized")
    protect: list[ProtectedLabel]
    agreement: float = Field(description="share of held-out rows predicted the same as fp32")


class OptimizedGraphs(BaseModel):
    """Graphs with ONNX Runtime's transformer fusions (calibrate.rap.optimize), served when present.

    The fp32 one is parity-checked against torch and shares the fp32 thresholds; the
    int8 one has thresholds fitted on its own deltas, like `Int8Variant`.
    """

    graph: str = Field(description="file name of the optimised fp32 graph")
    recipe: str = Field(description="how it was optimised")
    fused_operators: dict[str, int] = Field(default_factory=dict, description="fused operator -> count")
    parity_max_prob_diff: float = Field(description="max |p_opt - p_torch| at calibration")
    int8_graph: str | None = Field(None, description="file name of the optimised int8 graph")
    int8_recipe: str | None = None
    int8_protect: list[ProtectedLabel] | None = Field(None, description="thresholds of the optimised int8 graph")
    int8_agreement: float | None = Field(None, description="share of held-out rows predicted as the fp32 graph does")


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    guard_version: str = ""
    model: ModelInfo
    rap: RapToken
    protect: list[ProtectedLabel]
    default_frr: float = 0.01
    calibrated_on: str = Field(description="backend and precision the thresholds were fitted with")
    statistic: Literal["floored", "perturbed", "prob", "logodds"] = Field(
        "perturbed",
        description="what the RAP score measures (guard.core.rap): minus the log-odds drop counted from at least "
        "the label's floor (floored), the perturbed input's log-odds of the label (perturbed), minus the drop of "
        "p(label) (prob) or of its log-odds (logodds)",
    )
    int8: Int8Variant | None = Field(None, description="optional int8 graph with its own thresholds")
    optimized: OptimizedGraphs | None = Field(None, description="optional fused graphs (served when present)")
    features: FeatureDetector | None = Field(None, description="the feature detector, when calibrated with it")
    reader: ReaderDetector | None = Field(None, description="the reader detector, when calibrated with it")
    switch: SwitchDetector | None = Field(None, description="the switch detector, when calibrated with it")
    evaluation: dict[str, float] = Field(default_factory=dict, description="calibrated FAR per attack, if evaluated")
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")

    @model_validator(mode="after")
    def _switch_word_in_the_vocabulary(self) -> Manifest:
        """The switch pass inserts a vocabulary row: below the RAP row, which is appended at the vocabulary's end."""
        if self.switch is not None and not 0 <= self.switch.token_id < self.rap.token_id:
            raise ValueError(
                f"the switch word's id {self.switch.token_id} is not a vocabulary id (0..{self.rap.token_id - 1})"
            )
        return self

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors the bundle was calibrated for."""
        features = ("features",) if self.features is not None else ()
        reader = ("reader",) if self.reader is not None else ()
        return ("rap", *features, *reader, *(("switch",) if self.switch is not None else ()))


class Bundle:
    """A loaded, verified bundle."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def protect_labels(self) -> list[int]:
        return [p.label for p in self.manifest.protect]

    def protected(self, precision: str = "fp32") -> list[ProtectedLabel]:
        """Per-label calibration of the fp32 graph (optimised or not), of the int8 one, or of the optimised int8."""
        if precision == "fp32":
            return self.manifest.protect
        if precision == "int8-opt":
            opt = self.manifest.optimized
            if opt is None or opt.int8_protect is None:
                raise BundleError(f"{self.path} has no optimised int8 graph; recalibrate with `calibrate rap --int8`")
            return opt.int8_protect
        if precision == "int8":
            if self.manifest.int8 is None:
                raise BundleError(f"{self.path} has no int8 graph; recalibrate with `calibrate rap --int8`")
            return self.manifest.int8.protect
        raise BundleError(f"unknown precision {precision!r}; choose fp32, int8 or int8-opt")

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors this bundle was calibrated for."""
        return self.manifest.detectors

    def feature_stats(self) -> FeatureStats:
        if self.manifest.features is None:
            raise BundleError(f"{self.path} has no feature detector; rebuild it with `calibrate rap`")
        return FeatureStats.load(self.path / self.manifest.features.file)

    @property
    def sha256(self) -> str:
        """The bundle's hash: manifest.json's, which lists every other file's sha256."""
        return sha256_file(self.path / MANIFEST)

    def tokenizer(self, special_tokens: SpecialTokens = "text") -> RapTokenizer:
        m = self.manifest
        return RapTokenizer.from_file(
            self.path / "tokenizer.json", m.rap.token_id, m.model.max_length, special_tokens, m.rap.position
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(path: Path, manifest: Manifest) -> Manifest:
    """Hash every file already written under `path`, make it world-readable, write the manifest last."""
    _make_readable(path)
    files = {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p != path / MANIFEST
    }
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise BundleError(f"cannot save bundle {path}: missing {', '.join(missing)}")
    manifest = manifest.model_copy(update={"files": files})
    text = manifest.model_dump_json(indent=2)
    try:  # a value JSON cannot hold (an infinite threshold is written as null) must not make a bundle
        Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise BundleError(f"cannot save bundle {path}: its manifest would not load back: {exc.errors()[0]}") from None
    (path / MANIFEST).write_text(text + "\n", encoding="utf-8")
    (path / MANIFEST).chmod(READABLE_FILE)
    return manifest


def _make_readable(path: Path) -> None:
    """Files 0644, folders 0755 (the bundle folder included): any uid that mounts it can read it."""
    path.chmod(READABLE_DIR)
    for p in path.rglob("*"):
        if not p.is_symlink():
            p.chmod(READABLE_DIR if p.is_dir() else READABLE_FILE)


def read_manifest(path: Path) -> Manifest:
    """Parse the manifest without checking file hashes (for tools that only read it)."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a guard bundle: no {MANIFEST}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{manifest_path}: schema_version {version!r} is not supported (this guard reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if version == 1:
        raw = upgrade_v1(raw)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise BundleError(f"{manifest_path}: invalid field {where}: {first['msg']}") from exc


def upgrade_v1(raw: dict) -> dict:
    """A schema-1 manifest as schema 2: RAP thresholds were deltas flagged BELOW them (the score's
    negation, exactly: the k-th smallest delta is minus the k-th largest score); a missing
    statistic was "prob"."""
    raw = json.loads(json.dumps(raw))  # a deep copy
    tables = [*raw.get("protect", []), *((raw.get("int8") or {}).get("protect") or [])]
    tables += (raw.get("optimized") or {}).get("int8_protect") or []
    for label in tables:
        for key in ("thresholds", "percentiles"):
            label[key] = {frr: -value for frr, value in label.get(key, {}).items()}
        for pair in label.get("joint", {}).values():
            pair["rap"] = -pair["rap"]
    return {**raw, "schema_version": SCHEMA_VERSION, "statistic": raw.get("statistic", "prob")}


def load_bundle(path: Path) -> Bundle:
    """Read the manifest and verify every listed file's sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{path}: manifest lists no {name}")
    for rel, expected in manifest.files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{path}: manifest lists a file outside the bundle: {rel}")
        file = path / rel
        if not file.is_file():
            raise BundleError(f"{path}: {rel} is missing")
        if sha256_file(file) != expected:
            raise BundleError(f"{path}: {rel} does not match its recorded sha256 (modified or corrupted)")
    if not manifest.protect:
        raise BundleError(f"{path}: manifest protects no label")
    return Bundle(path, manifest)
