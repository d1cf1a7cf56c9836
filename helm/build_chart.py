"""Build the self-contained chart: `make chart`.

    python helm/build_chart.py dist/    # dist/backdoor-guard/ and dist/backdoor-guard-<version>.tgz

The alert rules and the Grafana dashboard are maintained in deploy/ (the compose stack and the
promtool tests read them there); the chart ships copies, made here: helm/backdoor-guard has no
links out of itself, so the directory this writes (or the archive `helm package` makes of it,
through helm-python-sdk) installs from anywhere.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "helm" / "backdoor-guard"
# In the chart -> in the repository.
COPIED = {
    "files/prometheus-rules.yml": ROOT / "deploy" / "prometheus" / "rules.yml",
    "files/grafana-dashboard.json": ROOT / "deploy" / "grafana" / "dashboards" / "backdoor-guard.json",
}


def assemble(into: Path) -> Path:
    """The chart directory with the copied files, as `into`/backdoor-guard (replaced if there)."""
    chart = into / SOURCE.name
    if chart.exists():
        shutil.rmtree(chart)
    shutil.copytree(SOURCE, chart, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for inside, source in COPIED.items():
        shutil.copyfile(source, chart / inside)
    return chart


def package(chart: Path, destination: Path) -> Path:
    import helm_python  # a dev dependency: `make setup`

    return Path(helm_python.package(chart, destination=destination))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("into", type=Path, help="output directory (created)")
    args = parser.parse_args(argv)
    args.into.mkdir(parents=True, exist_ok=True)
    archive = package(assemble(args.into), args.into)
    print(archive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
