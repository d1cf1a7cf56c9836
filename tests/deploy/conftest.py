"""Fixtures for the deployment tests: the repository paths and the real tools they run."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str, hint: str) -> str:
    """A binary from this environment's scripts or PATH; missing FAILS the test (a skip would hide breakage)."""
    scripts = Path(sysconfig.get_path("scripts")) / name
    path = str(scripts) if scripts.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: {hint}")
    return path


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read GUARD_* variables: the developer's own must not leak into tests."""
    for name in os.environ:
        if name.startswith("GUARD_"):
            monkeypatch.delenv(name)
