"""Write the chart's README.md from values.yaml and Chart.yaml: `make chart-readme`.

    python helm/chart_readme.py            # writes helm/backdoor-guard/README.md

helm-docs conventions: a `# -- text` comment (continued by the `#` lines right after it) just
above a key describes that key. Every leaf value gets a row; a map gets one too when it has a
description of its own. tests/deploy/test_chart_package.py checks the README is current.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "backdoor-guard"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?:\s|$)")
_DESCRIPTION = re.compile(r"^\s*# -- ?(?P<text>.*)$")
_CONTINUED = re.compile(r"^\s*# ?(?P<text>.*)$")


def descriptions(text: str) -> dict[str, str]:
    """Dotted key path -> its `# --` description, in file order."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        if match := _DESCRIPTION.match(line):
            pending = [match["text"]]
        elif pending is not None and (match := _CONTINUED.match(line)):
            pending.append(match["text"])
        elif match := _KEY.match(line):
            indent = len(match["indent"])
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match["key"])]
            if pending:
                found[".".join(k for _, k in stack)] = " ".join(pending)
            pending = None
        else:
            pending = None
    return found


def rows(values: dict, described: dict[str, str], prefix: str = "") -> list[tuple[str, object, str]]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            if path in described:
                out.append((path, value, described[path]))
            out.extend(rows(value, described, f"{path}."))
        else:
            out.append((path, value, described.get(path, "")))
    return out


def _type(value: object) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names[type(value)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(chart: Path = CHART) -> str:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text(encoding="utf-8"))
    text = (chart / "values.yaml").read_text(encoding="utf-8")
    lines = [
        f"# {meta['name']}",
        "",
        f"![Version: {meta['version']}](https://img.shields.io/badge/Version-{meta['version']}-informational)"
        f" ![AppVersion: {meta['appVersion']}](https://img.shields.io/badge/AppVersion-{meta['appVersion']}-informational)",
        "",
        meta["description"],
        "",
        "Generated from values.yaml by helm/chart_readme.py (`make chart-readme`); the project's operator",
        "guide (docs/operator/helm.md) has the tutorial (topologies, bundles, monitoring). Install the chart",
        "`make chart` builds: it carries the alert rules and the dashboard, which are maintained in deploy/.",
        "",
        "```sh",
        "make chart    # dist/backdoor-guard/ and dist/backdoor-guard-" + str(meta["version"]) + ".tgz",
        f"helm install guard dist/backdoor-guard-{meta['version']}.tgz -n ml --set bundle.pvc.claimName=guard-bundles",
        "```",
        "",
        f"Kubernetes: `{meta['kubeVersion']}`",
        "",
        "## Values",
        "",
        "| Key | Type | Default | Description |",
        "|-----|------|---------|-------------|",
    ]
    for path, value, description in rows(yaml.safe_load(text), descriptions(text)):
        default = _cell(json.dumps(value, separators=(", ", ": ")))
        lines.append(f"| {path} | {_type(value)} | `{default}` | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    (CHART / "README.md").write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
