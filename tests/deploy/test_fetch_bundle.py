"""The chart's fetch-bundle init container script, against a real HTTP server on loopback."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from guard.core.bundle import load_bundle
from tests.deploy.chart import CHART
from tests.server_fixtures import build_stub_bundle

SCRIPT = CHART / "files" / "fetch_bundle.py"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A web root with bundle.tar.gz (made as the README says: tar -C bundle -czf bundle.tar.gz .)."""
    bundle = build_stub_bundle(tmp_path / "bundle")
    root = tmp_path / "www"
    root.mkdir()
    with tarfile.open(root / "bundle.tar.gz", "w:gz") as tar:
        tar.add(bundle, arcname=".")
    with serving(root) as url:
        yield url, root


def fetch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_fetches_a_bundle_that_then_verifies(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    into = tmp_path / "mounted"
    into.mkdir()
    (into / "stale.bin").write_bytes(b"left by an earlier attempt")
    digest = hashlib.sha256((root / "bundle.tar.gz").read_bytes()).hexdigest()
    done = fetch("--url", f"{url}/bundle.tar.gz", "--sha256", digest.upper(), "--into", str(into))
    assert done.returncode == 0, done.stderr
    assert not (into / "stale.bin").exists()
    assert load_bundle(into).manifest.model.labels == ["negative", "positive"]  # every file's hash checks out


def test_refuses_an_archive_with_the_wrong_checksum(site: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = site
    done = fetch("--url", f"{url}/bundle.tar.gz", "--sha256", "0" * 64, "--into", str(tmp_path / "b"))
    assert done.returncode == 1 and "sha256 of" in done.stderr and "expected 000" in done.stderr
    assert not (tmp_path / "b").exists()  # nothing unpacked from an archive that failed its checksum


def test_refuses_a_missing_archive_and_one_without_a_manifest(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    missing = fetch("--url", f"{url}/nope.tar.gz", "--into", str(tmp_path / "a"))
    assert missing.returncode == 1 and "404" in missing.stderr
    with tarfile.open(root / "nested.tar.gz", "w:gz") as tar:  # the bundle one directory down
        info = tarfile.TarInfo("bundle/manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    nested = fetch("--url", f"{url}/nested.tar.gz", "--into", str(tmp_path / "b"))
    assert nested.returncode == 1 and "no manifest.json at its top level" in nested.stderr


def test_refuses_members_that_escape_the_directory(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    with tarfile.open(root / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"pwn"))
    done = fetch("--url", f"{url}/evil.tar.gz", "--into", str(tmp_path / "into"))
    assert done.returncode == 1 and "outside the destination" in done.stderr
    assert not (tmp_path / "escaped.txt").exists()
