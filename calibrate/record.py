"""The record every repair leaves, and the output folder it goes to.

A repair turns a suspect classifier directory into a new one (calibrate.repair: PURE,
MEFT, the FT/FTH baselines; calibrate.inversion: unlearn, harden). Each writes
`repair.json` into the model directory it produces; `calibrate rap` copies that
record into the bundle's report.json, so a bundle says which repair its model went
through. Shared by all three flows, so none of them imports another.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from calibrate.report import write_json
from guard.core.errors import InputError

REPAIR_RECORD = "repair.json"


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
        check_replaceable(out_dir, (model_dir,))
        shutil.rmtree(out_dir)


def check_replaceable(out_dir: Path, keep: Sequence[Path]) -> None:
    """Refuse to let `--force` delete `out_dir` when it is, or holds, an input or the working directory."""
    target = Path(out_dir).resolve()
    for path, what in [(Path(p), "the input model") for p in keep] + [(Path.cwd(), "the working directory")]:
        path = path.resolve()
        if path == target or target in path.parents:
            where = "is" if path == target else "holds"
            raise InputError(f"{out_dir} {where} {what}; --force will not delete it: choose another --out")


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
