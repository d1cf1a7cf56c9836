"""The chart's fetch-bundle init container script, against a real HTTP server on loopback."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
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


def fetch(
    *args: str, env: dict | None = None, python: tuple[str, ...] = (sys.executable,)
) -> subprocess.CompletedProcess:
    return subprocess.run([*python, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)


# The script run as on Python 3.11.0-3.11.3, which have no tarfile extraction filters: no
# tarfile.data_filter, and extractall() takes no `filter` (a TypeError).
BEFORE_FILTERS = (
    sys.executable,
    "-c",
    """
import runpy, sys, tarfile
del tarfile.data_filter
unfiltered = tarfile.TarFile.extractall
def extractall(self, path=".", members=None, *, numeric_owner=False):
    return unfiltered(self, path, members, numeric_owner=numeric_owner)
tarfile.TarFile.extractall = extractall
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""",
)
# pyproject allows Python >= 3.11; filters came with 3.11.4. Debian bookworm's python3 (the base of
# deploy/docker/buildah-local.sh) is 3.11.2.
FIRST_WITH_FILTERS = (3, 11, 4)


def _oldest_python_without_filters() -> str | None:
    for candidate in ("/usr/bin/python3.11", shutil.which("python3.11")):
        if not candidate or not Path(candidate).exists():
            continue
        version = subprocess.run(
            [candidate, "-c", "import sys; print(*sys.version_info[:3])"], capture_output=True, text=True, timeout=30
        )
        if tuple(map(int, version.stdout.split())) < FIRST_WITH_FILTERS:
            return candidate
    return None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    assert list((tmp_path / "b").iterdir()) == []  # nothing unpacked from an archive that failed its checksum


def test_refuses_a_missing_archive_and_one_without_a_manifest(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    missing = fetch("--url", f"{url}/nope.tar.gz", "--sha256", "0" * 64, "--into", str(tmp_path / "a"))
    assert missing.returncode == 1 and "404" in missing.stderr
    with tarfile.open(root / "nested.tar.gz", "w:gz") as tar:  # the bundle one directory down
        info = tarfile.TarInfo("bundle/manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    nested = fetch(
        "--url", f"{url}/nested.tar.gz", "--sha256", _sha(root / "nested.tar.gz"), "--into", str(tmp_path / "b")
    )
    assert nested.returncode == 1 and "no manifest.json at its top level" in nested.stderr


def test_refuses_members_that_escape_the_directory(site: tuple[str, Path], tmp_path: Path) -> None:
    url, root = site
    with tarfile.open(root / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"pwn"))
    done = fetch(
        "--url", f"{url}/evil.tar.gz", "--sha256", _sha(root / "evil.tar.gz"), "--into", str(tmp_path / "into")
    )
    assert done.returncode == 1 and "outside the destination" in done.stderr
    assert not (tmp_path / "escaped.txt").exists()


def test_refuses_plain_http_and_a_missing_checksum(tmp_path: Path) -> None:
    """A bundle decides what gets through: it comes over https, pinned by its sha256."""
    http = fetch("--url", "http://models.example.com/b.tar.gz", "--sha256", "0" * 64, "--into", str(tmp_path / "a"))
    assert http.returncode == 1 and "only https URLs are accepted" in http.stderr
    unpinned = fetch("--url", "https://models.example.com/b.tar.gz", "--into", str(tmp_path / "b"))
    assert unpinned.returncode == 2 and "--sha256" in unpinned.stderr


class PausingHandler(QuietHandler):
    """Sends half of the file, then waits for the test to look at the disk."""

    halfway = threading.Event()
    resume = threading.Event()

    def copyfile(self, source, outputfile) -> None:
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        type(self).halfway.set()
        type(self).resume.wait(timeout=30)
        outputfile.write(data[len(data) // 2 :])


def test_downloads_into_the_bundle_volume_not_tmp(site: tuple[str, Path], tmp_path: Path) -> None:
    """/tmp in the pod is a 64 Mi emptyDir: the archive must go where the bundle goes."""
    _, root = site
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(PausingHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    into, tmp = tmp_path / "volume", tmp_path / "tmp"
    tmp.mkdir()
    url = f"http://127.0.0.1:{server.server_address[1]}/bundle.tar.gz"
    args = [sys.executable, str(SCRIPT), "--url", url, "--sha256", _sha(root / "bundle.tar.gz"), "--into", str(into)]
    proc = subprocess.Popen(args, env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE, text=True)
    try:
        assert PausingHandler.halfway.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not any(p.stat().st_size for p in into.glob("*") if p.is_file()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first half reaches the volume
        during = {p.name: p.stat().st_size for p in into.iterdir()}
        assert list(during) == [".bundle.tar.gz.partial"] and during[".bundle.tar.gz.partial"] > 0, during
        assert list(tmp.iterdir()) == []
    finally:
        PausingHandler.resume.set()
        _, stderr = proc.communicate(timeout=60)
        server.shutdown()
    assert proc.returncode == 0, stderr
    assert ".bundle.tar.gz.partial" not in {p.name for p in into.iterdir()}  # deleted once unpacked
    assert load_bundle(into).manifest.model.labels == ["negative", "positive"]


@pytest.mark.parametrize("python", ["before-filters", "oldest-allowed"])
def test_works_on_pythons_without_extraction_filters(site: tuple[str, Path], tmp_path: Path, python: str) -> None:
    """Before: extractall(filter="data") raised an uncaught TypeError on Python 3.11.0-3.11.3."""
    if python == "oldest-allowed":
        found = _oldest_python_without_filters()
        if found is None:
            pytest.skip(f"no Python 3.11 older than {FIRST_WITH_FILTERS} here (Debian bookworm's python3 is 3.11.2)")
        command: tuple[str, ...] = (found,)
    else:
        command = BEFORE_FILTERS
    url, root = site
    digest = _sha(root / "bundle.tar.gz")
    done = fetch("--url", f"{url}/bundle.tar.gz", "--sha256", digest, "--into", str(tmp_path / "ok"), python=command)
    assert done.returncode == 0, done.stderr
    assert load_bundle(tmp_path / "ok").manifest.model.labels == ["negative", "positive"]

    for name, info in (("evil.tar.gz", tarfile.TarInfo("../escaped.txt")), ("link.tar.gz", _link("manifest.json"))):
        with tarfile.open(root / name, "w:gz") as tar:
            tar.addfile(info)
        into = tmp_path / name
        done = fetch("--url", f"{url}/{name}", "--sha256", _sha(root / name), "--into", str(into), python=command)
        assert done.returncode == 1 and "error: cannot fetch the bundle" in done.stderr, done.stderr
        assert list(into.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()


def _link(name: str) -> tarfile.TarInfo:
    """A symlink member pointing out of the destination."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info
