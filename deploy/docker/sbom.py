"""Write a CycloneDX 1.5 SBOM of the environment it runs in: the Python distributions on sys.path
and, when the system has a dpkg database, the Debian packages.

Run inside the image (standard library only), e.g. as deploy/docker/buildah-local.sh does:

    buildah run -v $PWD/deploy/docker:/sbom:ro CTR -- python /sbom/sbom.py > sbom.cdx.json
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

DPKG_STATUS = Path("/var/lib/dpkg/status")


def python_components() -> list[dict]:
    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() in seen:
            continue
        license_ = dist.metadata.get("License-Expression") or dist.metadata.get("License") or ""
        component = {
            "type": "library",
            "name": name,
            "version": dist.version,
            "purl": f"pkg:pypi/{name.lower().replace('_', '-')}@{dist.version}",
        }
        if license_ and len(license_) < 100:
            component["licenses"] = [{"license": {"name": license_}}]
        seen[name.lower()] = component
    return sorted(seen.values(), key=lambda c: c["name"].lower())


def debian_components() -> list[dict]:
    if not DPKG_STATUS.is_file():
        return []
    out = []
    for stanza in DPKG_STATUS.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status", "").endswith("installed") and "Package" in fields:
            name, version, arch = fields["Package"], fields.get("Version", ""), fields.get("Architecture", "")
            out.append(
                {
                    "type": "library",
                    "name": name,
                    "version": version,
                    "purl": f"pkg:deb/debian/{name}@{version}?arch={arch}",
                }
            )
    return sorted(out, key=lambda c: c["name"])


def main() -> int:
    sbom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {"component": {"type": "container", "name": "backdoor-guard"}},
        "components": python_components() + debian_components(),
    }
    json.dump(sbom, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
