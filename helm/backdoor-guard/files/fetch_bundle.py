"""Download a guard bundle archive into a directory: the chart's `fetch-bundle` init container.

    python fetch_bundle.py --url https://models.example.com/bundle.tar.gz --sha256 HEX --into /bundle

Standard library only: it runs in the guard image with a read-only root filesystem
(the download goes to /tmp). The archive holds the bundle directory's files at its top
level (`tar -C bundle -czf bundle.tar.gz .`). The archive's sha256 is checked here when
given; each file's own hash is checked next by `guard verify`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http(s) URL of the .tar.gz")
    parser.add_argument("--sha256", default="", help="expected sha256 of the archive (hex)")
    parser.add_argument("--into", type=Path, required=True, help="directory to fill (emptied first)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    args = parser.parse_args(argv)
    try:
        fetch(args.url, args.into, args.sha256, args.timeout)
    except (OSError, ValueError, tarfile.TarError) as exc:
        print(f"error: cannot fetch the bundle: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {args.url} into {args.into}")
    return 0


def fetch(url: str, into: Path, sha256: str, timeout: float) -> None:
    with tempfile.TemporaryFile() as archive:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                archive.write(chunk)
        if sha256 and digest.hexdigest() != sha256.strip().lower():
            raise ValueError(f"sha256 of {url} is {digest.hexdigest()}, expected {sha256}")
        archive.seek(0)
        _empty(into)  # a restarted init container finds the previous attempt's files
        with tarfile.open(fileobj=archive, mode="r:gz") as tar:
            tar.extractall(into, filter="data")  # refuses absolute paths, links out of `into`, devices
    if not (into / "manifest.json").is_file():
        raise ValueError(f"{url} has no manifest.json at its top level (make it with: tar -C bundle -czf FILE .)")


def _empty(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


if __name__ == "__main__":
    raise SystemExit(main())
