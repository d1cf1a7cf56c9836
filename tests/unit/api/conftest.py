"""Fixtures for the HTTP layer: the stub bundle, a stub backend, settings with no stray GUARD_* env."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from guard.settings import Settings
from tests.server_fixtures import StubBackend, build_stub_bundle


@pytest.fixture(scope="session")
def stub_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_stub_bundle(tmp_path_factory.mktemp("stub-bundle"))


@pytest.fixture(autouse=True)
def _no_guard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read GUARD_* variables: the developer's own must not leak into tests."""
    for name in os.environ:
        if name.startswith("GUARD_"):
            monkeypatch.delenv(name)


@pytest.fixture()
def stub() -> StubBackend:
    return StubBackend()


@pytest.fixture()
def make_settings(stub_bundle: Path) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        return Settings(bundle=stub_bundle, **overrides)

    return make
