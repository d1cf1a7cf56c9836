"""Every module of guard and calibrate sits in a layer of the import contracts (pyproject.toml),
so a new module cannot import across the architecture unnoticed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def _layered(contract: dict) -> set[str]:
    names = set()
    for layer in contract["layers"]:
        names |= {n.strip("() ") for n in re.split(r"[:|]", layer)}
    return names


def _children(package: str) -> set[str]:
    folder = ROOT / package
    modules = {p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def test_every_guard_module_is_in_the_layers_contract() -> None:
    contract = next(c for name, c in _contracts().items() if name.startswith("calibrate imports only guard.core"))
    assert {f"guard.{m}" for m in _children("guard")} <= _layered(contract)


def test_every_calibrate_module_is_in_the_calibrate_layers() -> None:
    contract = next(c for name, c in _contracts().items() if name.startswith("calibrate: cli"))
    assert _children("calibrate") <= _layered(contract)
