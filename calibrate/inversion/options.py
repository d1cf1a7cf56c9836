"""The options of DBS inversion, scan, unlearn and harden; free of torch, so the CLI reads
their defaults (and the choices it offers) here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

POSITIONS = ("start", "middle", "end", "random")
CRITERIA = ("loss", "asr")
RESET_MODES = ("outliers", "all", "none")
MAX_LENGTH = 64  # tokens per clean row the subject model reads


@dataclass(frozen=True)
class TemperatureOptions:
    """The parameters of DBS Algorithm 1 (paper values: c=2, d=5, u=2)."""

    initial: float = 1.0
    focus: float = 2.0  # c: lambda /= c when the loss is under the bound
    backtrack: float = 5.0  # d: lambda *= d (at most u) when it is not
    ceiling: float = 2.0  # u
    loss_bound: float = 0.2  # beta': the inversion loss that allows a temperature drop
    check_every: int = 5  # s: steps between two checks
    # Std of the random offset added to the weights on a backtrack, as a fraction of the
    # weights' spread at each position. The paper's absolute delta=10 is tied to its Adam
    # weight scale; relative to the spread, 0.3 reorders near-ties without a restart.
    noise: float = 0.3


@dataclass(frozen=True)
class InversionOptions:
    steps: int = 100  # DBS "epochs" (200 in the paper): each step is one pass over the inversion rows
    learning_rate: float = 2.0  # how far the best token's weight moves per step (see _Search.step)
    position: str = "start"
    allow_subwords: bool = False
    temperature: TemperatureOptions = field(default_factory=TemperatureOptions)
    stop_loss: float = 0.01  # stop early once the discrete trigger's loss is this low
    candidates: int = 4  # discrete triggers scored at every check: the argmax and its nearest neighbours
    seed: int = 13


@dataclass(frozen=True)
class ScanOptions:
    trigger_length: int = 1
    rows_per_label: int = 20  # inversion rows per victim label (DBS appendix A: 20)
    heldout_per_label: int = 200  # rows per victim label the discrete trigger is scored on
    criterion: str = "loss"  # "loss": backdoored if loss < loss_threshold; "asr": if ASR >= asr_threshold
    loss_threshold: float = 0.1
    asr_threshold: float = 0.9
    inversion: InversionOptions = field(default_factory=InversionOptions)
    progress: bool = True


@dataclass(frozen=True)
class UnlearnOptions:
    epochs: int = 2
    # MiniLM/SST-2 BadNet-RW, 698 rows, 2 epochs: 2e-5 left the trigger's ASR at 0.92; 1e-4 took it to 0.06
    learning_rate: float = 1e-4
    batch_size: int = 32
    stamp_fraction: float = 0.2  # share of the fine-tuning rows stamped with a trigger (DBS appendix A)
    position: str = "random"  # where triggers are stamped: the attack may have put them anywhere
    # 0: hard true labels (DBS as published); 1: the suspect's clean-row softmax. MiniLM/SST-2 BadNet-RW,
    # unlearning `mb`: CACC 88.9 -> 87.0 and ASR 21% with 0; 88.0 and 16% with 1
    teacher_weight: float = 1.0
    reset_embeddings: str = "outliers"  # trigger tokens given the mean embedding first: "outliers", "all", "none"
    # after a reset, no fine-tuning if every trigger's held-out ASR is this or lower: an EP backdoor lives
    # in its embedding row only, so the reset is the whole repair, and fine-tuning would only cost CACC
    # (MiniLM/SST-2 EP-neg: CACC 89.5 -> 86.8 with fine-tuning after the reset)
    reset_enough: float = 0.1
    holdout_fraction: float = 0.2  # rows kept out of fine-tuning to measure CACC and ASR on
    progress: bool = True
    seed: int = 13


@dataclass(frozen=True)
class HardenOptions:
    max_trigger_length: int = 8  # epsilon (the paper: 32 for short-text MR, 64 for IMDB)
    asr_bound: float = 0.8  # phi
    sync_gap: int = 2  # delta of Algorithm 1 line 5
    exhaustive_probability: float = 0.1  # p
    epochs: int = 2  # the paper's setting
    batch_size: int = 16  # rows of each label per round
    learning_rate: float = 2e-5  # the paper: 1e-5 (Adam)
    holdout_fraction: float = 0.3  # rows kept out of training to measure eps-mA^2 and CACC on
    measure: bool = True  # eps-mA^2 before and after (n(n-1)epsilon inversions each)
    measure_rows_per_label: int = 20  # inversion rows per label for the measurement, at most half (the rest score)
    inversion: InversionOptions = field(default_factory=lambda: InversionOptions(steps=30))
    progress: bool = True
    seed: int = 13


@dataclass(frozen=True)
class ScanJob:
    """`calibrate scan`: the report goes to `out`, the found triggers as guard probes to `probes_out`."""

    model: Path
    clean: Path
    options: ScanOptions = field(default_factory=ScanOptions)
    max_length: int = MAX_LENGTH
    out: Path | None = None
    probes_out: Path | None = None


@dataclass(frozen=True)
class UnlearnJob:
    """`calibrate unlearn`: the triggers a `scan` report flagged, or `triggers` (texts) flipping to `target`."""

    model: Path
    clean: Path
    out: Path
    options: UnlearnOptions = field(default_factory=UnlearnOptions)
    scan: Path | None = None
    triggers: tuple[str, ...] = ()
    target: int | None = None
    rescans: int = 2  # scans of the repaired model (0: none)
    max_length: int = MAX_LENGTH
    force: bool = False


@dataclass(frozen=True)
class HardenJob:
    model: Path
    clean: Path
    out: Path
    options: HardenOptions = field(default_factory=HardenOptions)
    max_length: int = MAX_LENGTH
    force: bool = False
