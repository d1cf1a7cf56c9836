"""The image's SBOM and stated size (issue 32): deploy/docker/sbom.cdx.json is what
deploy/docker/buildah-local.sh wrote from inside the last image it built."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# The image's platform: Debian bookworm's python3.11 on Linux x86-64.
IMAGE_ENV = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
             "python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython"}  # fmt: skip


def _locked() -> dict[str, str]:
    """The lock's pins whose environment markers hold in the image."""
    lines = re.findall(
        r"^([A-Za-z0-9_.-]+)==([^ \\\n;]+)(?: ; ([^\\\n]+))?", (DOCKER / "requirements-serve.lock").read_text(), re.M
    )
    return {_norm(name): version for name, version, marker in lines if not marker or Marker(marker).evaluate(IMAGE_ENV)}


def test_the_sbom_holds_exactly_the_locked_python_set_without_pip() -> None:
    sbom = json.loads((DOCKER / "sbom.cdx.json").read_text())
    assert (sbom["bomFormat"], sbom["specVersion"]) == ("CycloneDX", "1.5")
    python = {_norm(c["name"]): c["version"] for c in sbom["components"] if c["purl"].startswith("pkg:pypi/")}
    locked = _locked()
    installed_from_lock = {k: v for k, v in locked.items() if k not in {"pip", "setuptools"}}  # removed after install
    assert {k: python[k] for k in installed_from_lock} == installed_from_lock
    assert set(python) - set(installed_from_lock) == {"backdoor-guard"}
    assert "pip" not in python
    assert any(c["purl"].startswith("pkg:deb/debian/python3.11@") for c in sbom["components"])


def test_the_sbom_writer_runs_on_the_standard_library_alone() -> None:
    out = subprocess.run([sys.executable, "-I", str(DOCKER / "sbom.py")], capture_output=True, text=True, check=True)
    names = {_norm(c["name"]) for c in json.loads(out.stdout)["components"]}
    assert "pytest" in names  # this environment's own distributions


def test_the_size_check_enforces_the_size_the_docs_state() -> None:
    (limit,) = re.findall(r"^MAX_IMAGE_MB=(\d+)", (DOCKER / "buildah-local.sh").read_text(), re.M)
    assert f"stated **{limit} MB**" in (ROOT / "docs" / "operator" / "image.md").read_text()
