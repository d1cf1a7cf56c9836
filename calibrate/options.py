"""Options every flow shares, kept free of torch so the CLI can read their defaults cheaply.

`TrainOptions` drives every fine-tuning: `calibrate train`, the FT/FTH baselines, and
the last stage of PURE and MEFT. A `...Job` is one command's request: its files and
its options (the CLI builds it; a `run_...` function next to the code carries it out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.06
    seed: int = 13
    label_names: tuple[str, ...] = ()  # e.g. ("negative", "positive"); default LABEL_0, LABEL_1...
    progress: bool = True


@dataclass(frozen=True)
class TrainJob:
    """`calibrate train`: fine-tune `base` (a fresh head), or with `init` the FT/FTH baseline."""

    data: Path
    out: Path
    options: TrainOptions = field(default_factory=TrainOptions)
    dev: Path | None = None
    base: Path | None = None  # default: the packaged all-MiniLM-L6-v2
    init: Path | None = None  # an existing classifier to keep training (FT; FTH with high_lr)
    high_lr: bool = False
    force: bool = False


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("demo-out")
    seed: int = 7
    port: int | None = 8000  # None: stop after the offline checks
