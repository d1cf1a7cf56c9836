"""The repairs' options (PURE, MEFT), free of torch so the CLI reads their defaults here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from calibrate.options import TrainOptions


@dataclass(frozen=True)
class PruneOptions:
    max_accuracy_drop: float = 0.05  # stop once dev accuracy < unpruned accuracy - this (5 points)
    heads_per_step: int = 1  # heads removed between two accuracy checks (Algorithm 1: one)
    mu: float = 0.15  # eq. 3 weight; section 6.2: 0.15 for rare-word triggers, 0.05 for syntax and style
    finetune: TrainOptions = TrainOptions()
    batch_size: int = 64  # rows per forward pass when scoring heads and measuring accuracy
    progress: bool = True


@dataclass(frozen=True)
class MaxEntOptions:
    stop_distance: float = 0.01  # PURE appendix B ran MEFT to SD 0.01-0.015; MEFT section 5.5: below 0.1
    max_steps: int = 4000  # budget of the maximum-entropy phase (PURE appendix B: 4,000 steps)
    learning_rate: float = 2e-5  # of the maximum-entropy phase (constant)
    batch_size: int = 32
    check_every: int = 50  # steps between two stop-distance measurements
    distance_rows: int = 256  # clean rows the centroids are computed on
    fresh_head: bool = True  # False: keep the classifier's own head instead of simulating one
    head: TrainOptions = TrainOptions(epochs=1, learning_rate=1e-3)  # the simulated head, encoder frozen
    finetune: TrainOptions = TrainOptions()  # the final cross-entropy phase; its max_length and seed apply to all
    progress: bool = True


@dataclass(frozen=True)
class PruneJob:
    """`calibrate prune`: PURE on `model`, fine-tuned on `data`, heads scored and pruning stopped on `dev`."""

    model: Path
    data: Path
    dev: Path
    out: Path
    options: PruneOptions = field(default_factory=PruneOptions)
    force: bool = False


@dataclass(frozen=True)
class MaxEntJob:
    """`calibrate maxent`: MEFT on `model` with the clean rows in `data` (`dev`: accuracy after each phase)."""

    model: Path
    data: Path
    out: Path
    options: MaxEntOptions = field(default_factory=MaxEntOptions)
    dev: Path | None = None
    force: bool = False
