"""Download a guard bundle archive into a directory: the chart's `fetch-bundle` init container.

    python fetch_bundle.py --url https://models.example.com/bundle.tar.gz --sha256 HEX --into /bundle

Standard library only: it runs in the guard image with a read-only root filesystem.
The archive is downloaded INTO the directory it fills (the bundle volume, sized for
it), never into /tmp (a small volume), checked against its sha256, unpacked, deleted.
The archive holds the bundle directory's files at its top level
(`tar -C bundle -czf bundle.tar.gz .`); each file's own hash is checked next by
`guard verify`. Only https is accepted, except from a loopback address (tests, a mirror
in the pod); a redirect may not leave https either.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

CHUNK = 1 << 20
PARTIAL = ".bundle.tar.gz.partial"  # the download, inside --into until it is unpacked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="https URL of the .tar.gz")
    parser.add_argument("--sha256", required=True, help="expected sha256 of the archive (hex)")
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
    _check_url(url)
    _empty(into)  # a restarted init container finds the previous attempt's files
    archive = into / PARTIAL
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
            _check_url(response.geturl())  # where the redirects ended
            while chunk := response.read1(CHUNK):  # what has arrived, not a full CHUNK
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256.strip().lower():
            raise ValueError(f"sha256 of {url} is {digest.hexdigest()}, expected {sha256}")
        with tarfile.open(archive, mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.lstrip("./") != PARTIAL]
            _extract(tar, members, into)
    except BaseException:
        _empty(into)  # nothing is left of an archive that failed
        raise
    finally:
        archive.unlink(missing_ok=True)
    if not (into / "manifest.json").is_file():
        raise ValueError(f"{url} has no manifest.json at its top level (make it with: tar -C bundle -czf FILE .)")


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], into: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, members=members, filter="data")  # refuses absolute paths, links out, devices
        return
    # Python before 3.11.4 (Debian bookworm's 3.11.2) has no extraction filters: extractall
    # would take `filter` for an unknown keyword (TypeError) and, without it, follow any path.
    # A bundle is regular files in directories, so anything else is refused here.
    root = into.resolve()
    for member in members:
        target = (root / member.name).resolve()
        if target != root and root not in target.parents:
            raise ValueError(f"{member.name!r} would be extracted outside the destination {into}")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"{member.name!r} is not a regular file or directory")
        member.mode = 0o755 if member.isdir() else 0o644  # as the data filter leaves them: no setuid, readable
    tar.extractall(into, members=members)


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname or "")):
        return
    raise ValueError(f"{url}: only https URLs are accepted (http only from a loopback address)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _empty(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


if __name__ == "__main__":
    raise SystemExit(main())
