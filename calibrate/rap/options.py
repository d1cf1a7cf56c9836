"""What `calibrate rap` is asked to do: the RAP training options and the bundle options.

Free of torch, so the CLI reads its defaults here without loading a model stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guard.core.errors import InputError
from guard.core.family import RAP_POSITIONS, RapPosition
from guard.core.rap import DEFAULT_STATISTIC
from guard.core.types import Example

FRR_TARGETS = (0.005, 0.01, 0.03, 0.05)
MIN_TRAIN_ROWS = 16
MIN_CALIBRATION_ROWS = 50
# Held-out rows a label's threshold should have below it at the selection FRR: with fewer,
# one or two rows decide it (132 rows made a 1% threshold rest on one).
MIN_ROWS_BELOW_THRESHOLD = 5
# `reader`'s default: the reference model, else the packaged MiniLM, whichever has the suspect's
# vocabulary; none when neither has (calibrate.rap.reader.choose_reader)
AUTO_READER = "auto"


@dataclass(frozen=True)
class Attempt:
    """One rung of the ladder: loss weight and whether the row's norm may grow."""

    lower_bound_weight: float
    keep_norm: bool


# The paper's construction (objective "paper": SGD on the probability band) needs a ladder on
# confident models; the log-odds objective with Adam converges in one attempt.
PAPER_LADDER = (Attempt(1.0, True), Attempt(10.0, True), Attempt(10.0, False), Attempt(100.0, False))
DEFAULT_LADDER = (Attempt(1.0, False),)
OBJECTIVES = ("logodds", "paper")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class RapOptions:
    protect_labels: tuple[int, ...]
    init_word: str = "rq"
    # where pass 2 inserts the row (guard.core.family): "end", right before [SEP] / </s>, is the default; "front",
    # right after [CLS] / <s>, is the paper's and every bundle's before (matrix rows without `rap_position`)
    rap_position: RapPosition = "end"
    # objective "logodds": hinge on the drop of the protect label's log-odds into `logodds_band`
    # (nats); its gradient does not vanish at p ~ 0.999. "paper": RAP eq. 4 on the probability
    # drop, band [c_low, c_up]; kept to measure the published construction.
    objective: str = "logodds"
    c_low: float = 0.1
    c_up: float = 0.3
    logodds_band: tuple[float, float] = (2.0, 4.0)
    # what the RAP score measures at detection (guard.core.rap): "perturbed" (default), "prob", "logodds"
    statistic: str = DEFAULT_STATISTIC
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    epochs: int = 20
    batch_size: int = 32
    calibration_fraction: float = 0.5
    frr_targets: tuple[float, ...] = FRR_TARGETS
    ladder: tuple[Attempt, ...] = DEFAULT_LADDER
    select_frr: float = 0.01  # the FRR target whose held-out threshold picks the attempt
    seed: int = 13
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rap_position not in RAP_POSITIONS:
            raise InputError(f"rap_position must be one of {', '.join(RAP_POSITIONS)}, got {self.rap_position!r}")
        low, up = self.band
        if low >= up:
            raise InputError(f"{self.band_name}: the lower bound ({low:g}) must be below the upper one ({up:g})")

    @property
    def band(self) -> tuple[float, float]:
        """The band of clean drops the objective trains for, in its own units."""
        return (self.c_low, self.c_up) if self.objective == "paper" else self.logodds_band

    @property
    def band_name(self) -> str:
        """The options that set `band`."""
        return "c_low/c_up" if self.objective == "paper" else "logodds_band"


# "RAP as published" (Yang et al. 2021): probability band, SGD, 5 epochs, the ladder on top.
PAPER = {
    "objective": "paper",
    "rap_position": "front",
    "statistic": "prob",
    "optimizer": "sgd",
    "learning_rate": 1e-2,
    "epochs": 5,
    "ladder": PAPER_LADDER,
}


@dataclass(frozen=True)
class CalibrateOptions:
    rap: RapOptions
    max_length: int = 128
    classifier_max_length: int | None = None  # what the protected classifier reads (None: max_length)
    default_frr: float = 0.01
    canaries: int = 200
    int8: bool = False
    optimize: bool = True  # also write model.opt.onnx (+ model.int8.opt.onnx with --int8): calibrate.rap.optimize
    features: bool = True  # also fit the one-pass feature detector (guard.core.features)
    shrinkage: float = 0.5  # of the feature detector's covariance towards a scaled identity
    reference_model: Path | None = None  # the checkpoint the suspect was fine-tuned from: flags rows that moved far
    # a clean checkpoint of the suspect's tokenizer, the reader detector's base (guard.core.reader); AUTO_READER
    # picks one when a checkpoint at hand has the suspect's vocabulary; None: no reader
    reader: Path | str | None = AUTO_READER
    reader_epochs: int = 5  # of fine-tuning the reader on the RAP row's training half
    reader_learning_rate: float = 1e-4
    reader_objective: str = "distill"  # towards the suspect's probabilities, or "labels" (calibrate.rap.reader)
    reader_augment: int = 0  # distil on this many perturbed copies of each row too (calibrate.rap.reader.augmented)
    # unlabeled in-domain texts (e.g. a sample of traffic) the reader is distilled on too: a reader that agrees
    # with the suspect on more clean text leaves a lighter clean tail (calibrate.rap.reader)
    reader_texts: tuple[str, ...] = ()
    reader_texts_trusted: bool = False  # distil on every one of them, unscreened (calibrate.rap.reader.fit_reader)
    switch: bool = False  # the switch detector (guard.core.switch): one more pass, RAP's init word inserted untrained
    keep_hf: bool = False  # also write hf/ (the HF weights with the RAP row): the torch backend's, not serving's
    force: bool = False
    probes: tuple[Example, ...] = ()  # known-trigger rows (original labels), e.g. from `calibrate scan`

    def __post_init__(self) -> None:
        if self.reader_augment and self.reader_objective != "distill":
            raise InputError("--reader-augment needs --reader-objective distill: a perturbed copy keeps no label, "
                             "only the suspect's probabilities on it")  # fmt: skip
        if self.reader_texts_trusted and not self.reader_texts:
            raise InputError("--reader-texts-trusted needs --reader-texts")
        if self.reader_texts and self.reader is None:
            raise InputError("--reader-texts needs a reader (it was left out with --reader none)")
        if self.reader_texts and self.reader_objective != "distill":
            raise InputError("--reader-texts needs --reader-objective distill: the texts have no labels, the reader "
                             "learns the suspect's probabilities on them")  # fmt: skip


@dataclass(frozen=True)
class RapJob:
    """`calibrate rap`. With no `options.rap.protect_labels`, they are asked for on a terminal,
    else every label with enough clean rows is protected."""

    model: Path
    clean: Path
    out: Path
    options: CalibrateOptions
    probes: Path | None = None  # known-trigger rows for the bundle (`calibrate scan --probes-out`)
    reader_texts: Path | None = None  # unlabeled texts the reader is also distilled on (`load_texts`)
    reader_texts_trusted: bool = False  # distil on all of them, unscreened


@dataclass(frozen=True)
class EvaluateJob:
    bundle: Path
    clean: Path
    poisoned: tuple[str, ...]  # "[NAME=]FILE"; NAME defaults to the file's folder name
    target: int | None = None  # the attack's target label (default: the protected label)
    backend: str = "onnx"
    out: Path | None = None  # default: BUNDLE/evaluation
