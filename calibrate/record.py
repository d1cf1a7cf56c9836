"""Model repair before calibration: the FT/FTH baselines and the record every repair leaves.

A repair turns a suspect classifier directory into a new one (PURE: calibrate.prune,
MEFT: calibrate.maxent, or the fine-tuning baselines here). Each writes `repair.json`
into the model directory it produces; `calibrate rap` copies that record into the
bundle's report.json, so a bundle says which repair its model went through.

Baselines (PURE section 6.1 and appendix B): FT keeps fine-tuning the suspect
classifier on clean rows; FTH does the same at a higher learning rate (Kurita et
al., 2020), 2.5x FT's, the ratio of the papers' 5e-5 to 2e-5.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from calibrate.report import write_json
from calibrate.train import TrainOptions, TrainResult, fine_tune
from guard.core.errors import InputError
from guard.core.types import Example

REPAIR_RECORD = "repair.json"
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


def prepare_out_dir(model_dir: Path, out_dir: Path, force: bool) -> None:
    """A repair never writes over its input model; a non-empty `out_dir` is replaced only when forced."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise InputError(f"{out_dir} is the input model; write the repaired model somewhere else")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise InputError(f"{out_dir} already exists and is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)


def write_record(out_dir: Path, method: str, source: Path, details: dict) -> None:
    """Write `repair.json`: which repair produced this model, from what, with which settings and results."""
    write_json(Path(out_dir) / REPAIR_RECORD, {"method": method, "source": str(Path(source).resolve()), **details})


def read_record(model_dir: Path) -> dict | None:
    """The repair record of a model directory, or None for a model no repair produced."""
    path = Path(model_dir) / REPAIR_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable repair record ({exc})") from exc
