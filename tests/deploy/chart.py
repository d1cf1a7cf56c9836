"""Render and lint the Helm chart offline with helm-python-sdk (Helm 4 as a library).

No cluster and no `helm` binary: `Chart.render` runs Helm's own template engine and
values-schema validation. The SDK's Python wrapper does not pass a Kubernetes version
or extra API versions to `.Capabilities` yet, though the native `helm_render` call it
wraps accepts both (`kube_version`, `api_versions`); `render` below passes them there,
which is why pyproject pins helm-python-sdk.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml
from helm_python import _native

from tests.deploy.conftest import ROOT

CHART = ROOT / "helm" / "backdoor-guard"
BUILD = ROOT / "helm" / "build_chart.py"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
RELEASE, NAMESPACE = "guard", "ml"


@functools.cache
def built() -> Path:
    """The chart as `make chart` builds it (helm/build_chart.py), in a temporary directory:
    what the tests render and lint. CHART itself lacks the files copied in from deploy/."""
    into = Path(tempfile.mkdtemp(prefix="chart-"))
    atexit.register(shutil.rmtree, into, True)
    subprocess.run([sys.executable, str(BUILD), str(into)], check=True, capture_output=True, timeout=120)
    return into / CHART.name


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(built())


def ci_values() -> dict[str, dict]:
    """The chart's ci/*-values.yaml files (chart-testing's convention), by case name."""
    files = sorted((CHART / "ci").glob("*-values.yaml"))
    return {f.name.removesuffix("-values.yaml"): yaml.safe_load(f.read_text(encoding="utf-8")) for f in files}


@dataclass(frozen=True)
class Manifests:
    """Every object a render produced, plus NOTES.txt."""

    objects: list[dict]
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        (found,) = self.of_kind(kind)
        return found

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}


def render(
    values: dict,
    kube_version: str,
    api_versions: Iterable[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    source: helm.Chart | None = None,
) -> Manifests:
    """`helm template` of `source` (default: the built chart)."""
    options = {
        "name": release,
        "namespace": namespace,
        "is_install": True,
        "kube_version": kube_version,
        "api_versions": list(api_versions),
    }
    rendered: dict[str, str] = json.loads(
        _native.call_string("helm_render", (source or chart())._raw(), json.dumps(values), json.dumps(options))
    )
    objects = [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    notes = next((text for path, text in rendered.items() if path.endswith("NOTES.txt")), "")
    return Manifests(objects, notes)


def lint(values: dict, kube_version: str) -> list[dict]:
    """`helm lint --strict` findings of warning level and above (info, such as 'icon is recommended', is left out)."""
    report = helm.lint(built(), values, strict=True, kube_version=kube_version)
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


def pod_spec(manifests: Manifests) -> dict:
    return manifests.one("Deployment")["spec"]["template"]["spec"]


def containers(manifests: Manifests) -> dict[str, dict]:
    """Every container of the Deployment's pod, init containers included, by name."""
    spec = pod_spec(manifests)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pod_path(container: dict, volumes: dict[str, Path], image_root: Path, path: str) -> str:
    """Where an absolute path inside `container` lies on this machine: in the volume mounted
    there (the longest mount path wins; a mount hides what the image has below it), else
    in the image's own filesystem under `image_root`."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
    for mount in mounts:
        prefix = mount["mountPath"].rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            volume = volumes[mount["name"]] / mount.get("subPath", "")
            return str(volume) + path[len(prefix) :]
    return str(image_root) + path


def in_pod(container: dict, volumes: dict[str, Path], image_root: Path) -> list[str]:
    """The container's command and args, every absolute path argument mapped by `pod_path`."""
    argv = container.get("command", []) + container.get("args", [])
    return argv[:1] + [pod_path(container, volumes, image_root, a) if a.startswith("/") else a for a in argv[1:]]


def settings_config_map(manifests: Manifests) -> dict:
    """The ConfigMap of guard.yaml and fetch_bundle.py (not the dashboard's)."""
    (found,) = [c for c in manifests.of_kind("ConfigMap") if "guard.yaml" in c["data"]]
    return found
