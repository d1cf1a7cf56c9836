"""The fine-tuning repair baselines (PURE section 6.1 and appendix B).

FT keeps fine-tuning the suspect classifier on clean rows; FTH does the same at a
higher learning rate (Kurita et al., 2020), 2.5x FT's, the ratio of the papers'
5e-5 to 2e-5. `calibrate train --init [--high-lr]` runs them; `run_train` is the whole
`calibrate train` command, training from a base encoder included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from calibrate.data import load_examples
from calibrate.model import default_base_model
from calibrate.options import TrainJob, TrainOptions
from calibrate.record import prepare_out_dir, write_record
from calibrate.train import TrainResult, fine_tune, train_classifier
from guard.core.errors import InputError
from guard.core.types import Example

FTH_LR_FACTOR = 2.5
FT_OPTIONS = TrainOptions()


def ft(
    model_dir: Path,
    train: list[Example],
    out_dir: Path,
    options: TrainOptions = FT_OPTIONS,
    dev: list[Example] | None = None,
    force: bool = False,
) -> TrainResult:
    """FT: fine-tune the suspect classifier on clean rows; the repaired model goes to `out_dir`."""
    return _baseline("ft", model_dir, train, out_dir, options, dev, force)


def fth(
    model_dir: Path,
    train: list[Example],
    out_dir: Path,
    options: TrainOptions = FT_OPTIONS,
    dev: list[Example] | None = None,
    force: bool = False,
) -> TrainResult:
    """FTH: FT at `FTH_LR_FACTOR` times `options.learning_rate`."""
    faster = replace(options, learning_rate=options.learning_rate * FTH_LR_FACTOR)
    return _baseline("fth", model_dir, train, out_dir, faster, dev, force)


def _baseline(
    method: str,
    model_dir: Path,
    train: list[Example],
    out_dir: Path,
    options: TrainOptions,
    dev: list[Example] | None,
    force: bool,
) -> TrainResult:
    prepare_out_dir(model_dir, out_dir, force)
    result = fine_tune(model_dir, train, out_dir, options, dev)
    write_record(
        out_dir,
        method,
        model_dir,
        {
            "options": asdict(options),
            "train_rows": result.train_rows,
            "dev_accuracy": result.dev_accuracy,
            "seconds": {"fine_tune": round(result.seconds, 2)},
        },
    )
    return result


def run_train(job: TrainJob, say: Callable[[str], None] = print) -> TrainResult:
    """`calibrate train`: a fresh head on `job.base`, or with `job.init` the FT (FTH: `high_lr`) baseline."""
    if job.high_lr and not job.init:
        raise InputError("--high-lr is for fine-tuning an existing classifier: pass --init MODEL")
    train = load_examples(job.data)
    dev = load_examples(job.dev) if job.dev else None
    if job.init:
        repair = fth if job.high_lr else ft
        result = repair(job.init, train, job.out, job.options, dev=dev, force=job.force)
    else:
        result = train_classifier(job.base or default_base_model(), train, job.out, job.options, dev)
    accuracy = f", dev accuracy {result.dev_accuracy:.4f}" if result.dev_accuracy is not None else ""
    say(f"saved {result.out_dir} ({result.train_rows} rows, {result.seconds:.0f} s{accuracy})")
    return result
