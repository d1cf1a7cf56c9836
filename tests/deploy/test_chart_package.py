"""The chart as operators get it: `make chart` (helm/build_chart.py) builds a self-contained
directory and `helm package` archive; its README is generated from values.yaml; its default
image names a registry.

Before issue 32: files/grafana-dashboard.json and files/prometheus-rules.yml were symlinks into
deploy/, so a copied chart failed to load; `helm show readme` was empty; the default image was a
bare name (Docker Hub).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from tests.deploy import chart
from tests.deploy.conftest import ROOT

PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
CASE = chart.ci_values()["standalone-url"]
ALL_ON = {**CASE, "grafanaDashboard": {"enabled": True}}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "helm" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_source_chart_has_no_links_out_of_itself() -> None:
    links = [p for p in chart.CHART.rglob("*") if p.is_symlink()]
    assert links == []


def test_the_packaged_chart_installs_from_anywhere(tmp_path: Path) -> None:
    """`make chart`'s archive, moved away from the checkout, renders the rules and the dashboard."""
    make = subprocess.run(["make", "-n", "chart"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "helm/build_chart.py dist" in make.stdout
    built = subprocess.run(
        [sys.executable, str(chart.BUILD), str(tmp_path / "dist")], capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    archive = Path(built.stdout.strip())
    assert archive.name == f"backdoor-guard-{chart.chart().metadata['version']}.tgz"
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert all(m.isfile() or m.isdir() for m in members)
    names = {m.name for m in members}
    assert {"backdoor-guard/files/prometheus-rules.yml", "backdoor-guard/README.md"} <= names
    assert not any("/ci/" in n for n in names)  # .helmignore: CI values stay out

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = Path(shutil.move(archive, elsewhere / archive.name))
    shutil.rmtree(tmp_path / "dist")
    loaded = helm.Chart.load(moved)
    manifests = chart.render(ALL_ON, "v1.31.0", (PROMETHEUS_RULE_API,), source=loaded)
    groups = manifests.one("PrometheusRule")["spec"]["groups"]
    assert len(groups) == len(yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())["groups"])
    dashboards = [c for c in manifests.of_kind("ConfigMap") if "backdoor-guard.json" in c.get("data", {})]
    assert len(dashboards) == 1 and dashboards[0]["data"]["backdoor-guard.json"].strip()
    readme = (chart.CHART / "README.md").read_text(encoding="utf-8")
    assert helm.show(str(moved), output_format="readme").strip() == readme.strip()


def test_the_source_chart_says_to_build_it_rather_than_render_empty_rules() -> None:
    source = helm.Chart.load(chart.CHART)
    with pytest.raises(helm.HelmError, match="make chart"):
        chart.render(CASE, "v1.31.0", (PROMETHEUS_RULE_API,), source=source)
    with pytest.raises(helm.HelmError, match="make chart"):
        chart.render(ALL_ON, "v1.31.0", source=source)
    chart.render(CASE, "v1.31.0", source=source)  # neither asked for: it renders


def test_the_chart_readme_is_generated_from_the_current_values() -> None:
    """Regenerate with `make chart-readme`."""
    readme = _module("chart_readme")
    assert (chart.CHART / "README.md").read_text(encoding="utf-8") == readme.render()


def test_the_chart_readme_describes_values_by_their_comments() -> None:
    readme = _module("chart_readme")
    text = "# -- where\n# to look\nimage:\n  # -- the registry\n  repository: r.io/x\n  tag: ''\nplain: 1\n"
    described = readme.descriptions(text)
    assert described == {"image": "where to look", "image.repository": "the registry"}
    assert readme.rows(yaml.safe_load(text), described) == [
        ("image", {"repository": "r.io/x", "tag": ""}, "where to look"),
        ("image.repository", "r.io/x", "the registry"),
        ("image.tag", "", ""),
        ("plain", 1, ""),
    ]


def test_the_default_image_names_its_registry() -> None:
    """A bare name (`backdoor-guard`) resolves to Docker Hub's library namespace."""
    repository = chart.chart().values["image"]["repository"]
    registry = repository.split("/")[0]
    assert "/" in repository and ("." in registry or ":" in registry or registry == "localhost"), repository
    image = chart.containers(chart.render({"bundle": {"pvc": {"claimName": "b"}}}, "v1.31.0"))["guard"]["image"]
    assert image == f"{repository}:{chart.chart().metadata['appVersion']}"
