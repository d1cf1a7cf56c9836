"""What `calibrate rap` is asked to do: the RAP training options and the bundle options.

Free of torch, so the CLI reads its defaults here without loading a model stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guard.core.types import Example

FRR_TARGETS = (0.005, 0.01, 0.03, 0.05)
MIN_TRAIN_ROWS = 16
MIN_CALIBRATION_ROWS = 50
# Held-out rows a label's threshold should have below it at the selection FRR: with fewer,
# one or two rows decide it (132 rows made a 1% threshold rest on one).
MIN_ROWS_BELOW_THRESHOLD = 5


@dataclass(frozen=True)
class Attempt:
    """One rung of the ladder: loss weight and whether the row's norm may grow."""

    lower_bound_weight: float
    keep_norm: bool


DEFAULT_LADDER = (Attempt(1.0, True), Attempt(10.0, True), Attempt(10.0, False), Attempt(100.0, False))


@dataclass(frozen=True)
class RapOptions:
    protect_labels: tuple[int, ...]
    init_word: str = "rq"
    c_low: float = 0.1  # the band of clean drops RAP trains for, with statistic "prob" (the paper's)
    c_up: float = 0.3
    statistic: str = "prob"  # what delta measures: "prob" (the paper) or "logodds" (guard.core.rap)
    logodds_band: tuple[float, float] = (1.0, 3.0)  # the band with statistic "logodds", in nats
    learning_rate: float = 1e-2
    epochs: int = 5
    batch_size: int = 32
    calibration_fraction: float = 0.5
    frr_targets: tuple[float, ...] = FRR_TARGETS
    ladder: tuple[Attempt, ...] = DEFAULT_LADDER
    select_frr: float = 0.01  # the FRR target whose held-out threshold picks the attempt
    seed: int = 13
    progress: bool = True

    @property
    def band(self) -> tuple[float, float]:
        """The clean-drop band in the statistic's own units."""
        return (self.c_low, self.c_up) if self.statistic == "prob" else self.logodds_band


@dataclass(frozen=True)
class CalibrateOptions:
    rap: RapOptions
    max_length: int = 128
    classifier_max_length: int | None = None  # what the protected classifier reads (None: max_length)
    default_frr: float = 0.01
    canaries: int = 200
    int8: bool = False
    optimize: bool = True  # also write model.opt.onnx (+ model.int8.opt.onnx with --int8): calibrate.rap.optimize
    keep_hf: bool = False  # also write hf/ (the HF weights with the RAP row): the torch backend's, not serving's
    force: bool = False
    probes: tuple[Example, ...] = ()  # known-trigger rows (original labels), e.g. from `calibrate scan`


@dataclass(frozen=True)
class RapJob:
    """`calibrate rap`. With no `options.rap.protect_labels`, they are asked for on a terminal,
    else every label with enough clean rows is protected."""

    model: Path
    clean: Path
    out: Path
    options: CalibrateOptions
    probes: Path | None = None  # known-trigger rows for the bundle (`calibrate scan --probes-out`)


@dataclass(frozen=True)
class EvaluateJob:
    bundle: Path
    clean: Path
    poisoned: tuple[str, ...]  # "[NAME=]FILE"; NAME defaults to the file's folder name
    target: int | None = None  # the attack's target label (default: the protected label)
    backend: str = "onnx"
    out: Path | None = None  # default: BUNDLE/evaluation
