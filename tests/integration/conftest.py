"""Fixtures for the server integration tests (real uvicorn, real upstream, real Prometheus).

None is autouse: other integration tests in this folder are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_fixtures import build_onnx_bundle, build_stub_bundle, running_echo_upstream


@pytest.fixture(scope="session")
def stub_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_stub_bundle(tmp_path_factory.mktemp("stub-bundle"))


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real bundle (tiny random BERT exported to ONNX) that `guard serve` loads from disk."""
    return build_onnx_bundle(tmp_path_factory.mktemp("onnx-bundle"), tiny_model_dir)


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read GUARD_* variables: the developer's own must not leak into tests."""
    for name in os.environ:
        if name.startswith("GUARD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[str]:
    """A real upstream process on loopback that echoes requests as JSON; yields its base URL."""
    with running_echo_upstream() as url:
        yield url
