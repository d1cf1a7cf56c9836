"""The rendered pod as a cluster would run it: its init containers' commands run here on
directories standing for its volumes and images, the bundle read as the image's uid,
shutdown ordering and timings, and the NetworkPolicy of the sidecar topology.

Each test here failed on the chart before issue 16 (see the test's docstring for how).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest

from guard.core.bundle import load_bundle
from guard.server import GRACEFUL_SHUTDOWN_S
from guard.settings import Settings
from tests.deploy import chart
from tests.server_fixtures import build_stub_bundle

CASES = chart.ci_values()
IMAGE_UID = 10001  # the Dockerfile's USER
UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}


def render(values: str | dict, kube: str = "1.31.0") -> chart.Manifests:
    return chart.render(CASES[values] if isinstance(values, str) else values, f"v{kube}")


def quantity(text: str | int) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return int(float(number) * UNITS[unit])


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory any uid can enter (pytest's tmp_path is 0700 to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="guard-pod-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _verify(manifests: chart.Manifests, volumes: dict[str, Path], **run) -> subprocess.CompletedProcess:
    """The verify-bundle init container, its paths mapped, run with this checkout's `guard` CLI."""
    verify = chart.containers(manifests)["verify-bundle"]
    argv = chart.in_pod(verify, volumes, Path("/nonexistent"))
    return subprocess.run([sys.executable, "-m", "guard.cli", *argv], capture_output=True, text=True, **run)


# ---------------------------------------------------------------- bundle delivery


@pytest.mark.parametrize("kube", ["1.28.0", "1.31.0"])
def test_the_image_source_copies_the_bundle_out_of_its_image(kube: str, tmp_path: Path) -> None:
    """Before: the emptyDir was mounted at /bundle, the image's own bundle path, so it hid the
    image's files, `cp -R /bundle/. /bundle` copied nothing and verify failed."""
    manifests = render("sidecar-image", kube)
    image_root = tmp_path / "bundle-image"
    build_stub_bundle(image_root / CASES["sidecar-image"]["bundle"]["image"]["path"].lstrip("/"))
    volumes = {"bundle": tmp_path / "volume", "tmp": tmp_path / "tmp"}
    for volume in volumes.values():
        volume.mkdir()
    copy = chart.containers(manifests)["copy-bundle"]
    done = subprocess.run(chart.in_pod(copy, volumes, image_root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    verified = _verify(manifests, volumes)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr


def test_a_bundle_image_path_under_the_chart_mount_is_refused() -> None:
    values = {
        **CASES["sidecar-image"],
        "bundle": {
            **CASES["sidecar-image"]["bundle"],
            "image": {**CASES["sidecar-image"]["bundle"]["image"], "path": "/guard-bundle-out/b"},
        },
    }
    with pytest.raises(helm.HelmError, match="bundle.image.path may not be /guard-bundle-out"):
        render(values)


@pytest.mark.parametrize("case", ["standalone-url", "sidecar-image"])
def test_the_writer_fills_the_bundle_volume_and_requests_its_size(case: str) -> None:
    """Before: fetch-bundle downloaded to /tmp (a 64 Mi emptyDir; the demo archive is ~168 MB)
    and no init container requested resources or ephemeral storage."""
    manifests = render(case)
    spec = chart.pod_spec(manifests)
    writer = spec["initContainers"][0]
    assert {m["name"] for m in writer["volumeMounts"]} <= {"bundle", "config"}  # no /tmp
    (volume,) = [v for v in spec["volumes"] if v["name"] == "bundle"]
    size = quantity(volume["emptyDir"]["sizeLimit"])
    assert size >= 2**30
    assert quantity(writer["resources"]["requests"]["ephemeral-storage"]) >= size
    for container in spec["initContainers"]:
        if container.get("restartPolicy") == "Always":
            continue  # the native sidecar guard: the guard's own resources
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and "memory" in limits, container["name"]
    guard = chart.containers(manifests)["guard"]
    (tmp,) = [v for v in spec["volumes"] if v["name"] == "tmp"]
    assert quantity(guard["resources"]["requests"]["ephemeral-storage"]) >= quantity(tmp["emptyDir"]["sizeLimit"])


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another uid needs root")
def test_a_saved_bundle_is_readable_by_the_images_uid(shared_dir: Path) -> None:
    """Before: hf/model.safetensors was written 0600 (safetensors does), so `docker run -v`,
    the compose quick start and the image source failed for uid 10001."""
    bundle = shared_dir / "bundle"
    bundle.mkdir(mode=0o700)
    (bundle / "hf").mkdir(mode=0o700)
    weights = os.open(bundle / "hf" / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(weights, b"weights only the writer could read")
    os.close(weights)
    build_stub_bundle(bundle)  # save_bundle hashes every file, hf/ included
    for path in [bundle, *bundle.rglob("*")]:
        assert path.stat().st_mode & 0o444 == 0o444, path
    files = load_bundle(bundle).manifest.files
    assert "hf/model.safetensors" in files
    # What `guard verify` and the server do first: read every file, here as the image's uid
    # (this checkout's Python may sit where that uid cannot go, so coreutils' sha256sum reads).
    done = subprocess.run(
        ["sha256sum", "manifest.json", *files],
        cwd=bundle,
        capture_output=True,
        text=True,
        user=IMAGE_UID,
        group=IMAGE_UID,
        extra_groups=[],
    )
    assert done.returncode == 0, done.stderr
    read = dict(reversed(line.split("  ", 1)) for line in done.stdout.splitlines())
    assert {name: read[name] for name in files} == files


# ---------------------------------------------------------------- isolation


def test_the_sidecar_classifier_is_reachable_only_through_the_guard() -> None:
    """Before: no NetworkPolicy, so any pod could call the classifier's own port and skip the guard."""
    manifests = render("sidecar-url")
    policy = manifests.one("NetworkPolicy")
    kubernetes_validate.validate(policy, "1.31.0", strict=True)
    spec = policy["spec"]
    labels = manifests.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    assert ports == {chart.chart().values["port"], chart.chart().values["metricsPort"]}  # the guard's two
    assert CASES["sidecar-url"]["sidecar"]["upstreamPort"] not in ports
    assert all("ports" in rule for rule in spec["ingress"])  # no rule that opens every port

    assert "NetworkPolicy" not in render("standalone-pvc").kinds()  # standalone: off unless asked
    opened = render({**CASES["standalone-pvc"], "networkPolicy": {"enabled": True, "from": [{"podSelector": {}}]}})
    assert opened.one("NetworkPolicy")["spec"]["ingress"][0]["from"][0] == {"podSelector": {}}  # + helm test, scraper
    off = render({**CASES["sidecar-url"], "networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in off.kinds()


def test_a_separate_metrics_port_is_wired_through() -> None:
    prometheus = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    values = {**CASES["sidecar-url"], "metricsPort": 9090, "networkPolicy": {"metricsFrom": prometheus}}
    manifests = chart.render(values, "v1.31.0", ["monitoring.coreos.com/v1/ServiceMonitor"])
    guard = chart.containers(manifests)["guard"]
    assert {"name": "GUARD_METRICS_PORT", "value": "9090"} in guard["env"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in guard["ports"]
    service_ports = {p["name"]: p["port"] for p in manifests.one("Service")["spec"]["ports"]}
    assert service_ports == {"http": chart.chart().values["port"], "metrics": 9090}
    assert manifests.one("ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    rules = manifests.one("NetworkPolicy")["spec"]["ingress"]
    assert [r["ports"][0]["port"] for r in rules] == [chart.chart().values["port"], 9090]
    assert rules[1]["from"] == prometheus
    unset = chart.render({**CASES["sidecar-url"], "metricsPort": None}, "v1.31.0", [chart.SERVICE_MONITOR_API])
    assert unset.one("ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    assert "GUARD_METRICS_PORT" not in chart.env(chart.containers(unset)["guard"])


@pytest.mark.parametrize("kube", ["1.28.0", "1.31.0"])
def test_nothing_is_imposed_on_the_classifier_container(kube: str) -> None:
    """Before: the pod securityContext (uid 10001, fsGroup) applied to the user's classifier too."""
    spec = chart.pod_spec(render("sidecar-url", kube))
    assert spec["securityContext"] == {}
    (classifier,) = [c for c in spec["containers"] if c["name"] == "sentiment"]
    assert "securityContext" not in classifier
    assert chart.pod_spec(render("standalone-pvc", kube))["securityContext"]["runAsUser"] == IMAGE_UID


# ---------------------------------------------------------------- shutdown


def _seconds(pre_stop: dict) -> int:
    if "sleep" in pre_stop:
        return pre_stop["sleep"]["seconds"]
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and shutil.which("sleep"), command
    return int(command[1])


@pytest.mark.parametrize("case", list(CASES))
def test_the_grace_period_covers_the_pre_stop_delay_and_the_drain(case: str) -> None:
    """Before: no preStop delay (requests still routed to a pod that had stopped listening), and
    the 40 s grace period was shorter than the 30 s drain plus the 30 s upstream timeout."""
    spec = chart.pod_spec(render(case))
    guard_delay = _seconds(chart.containers(render(case))["guard"]["lifecycle"]["preStop"])
    assert guard_delay >= 5
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= guard_delay + GRACEFUL_SHUTDOWN_S
    if CASES[case]["topology"] == "sidecar":
        upstream = (
            CASES[case]
            .get("settings", {})
            .get("upstream_timeout_s", Settings.model_fields["upstream_timeout_s"].default)
        )
        classifier = spec["containers"][-1]
        classifier_delay = _seconds(classifier["lifecycle"]["preStop"])
        # The classifier keeps serving until the guard has stopped sending it requests...
        assert classifier_delay >= guard_delay + GRACEFUL_SHUTDOWN_S
        # ...and the pod waits for it to finish the last of them.
        assert grace >= classifier_delay + upstream


def test_native_sidecar_stops_after_the_classifier_and_older_clusters_get_an_exec_delay() -> None:
    """Kubernetes stops restartable init containers after the regular ones: the guard outlives
    the classifier. The classifier's delay is the sleep action from 1.30, `sleep` before."""
    native = chart.pod_spec(render("sidecar-url", "1.31.0"))
    assert native["initContainers"][-1]["name"] == "guard" and native["initContainers"][-1]["restartPolicy"] == "Always"
    assert native["containers"][-1]["lifecycle"]["preStop"] == {"sleep": {"seconds": 40}}
    older = chart.pod_spec(render("sidecar-url", "1.29.0"))
    assert older["containers"][-1]["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "40"]}}


def test_a_grace_period_too_short_for_the_drain_is_refused() -> None:
    with pytest.raises(helm.HelmError, match=r"terminationGracePeriodSeconds \(40\) is shorter"):
        render({**CASES["sidecar-url"], "terminationGracePeriodSeconds": 40})
    assert (
        chart.pod_spec(render({**CASES["sidecar-url"], "terminationGracePeriodSeconds": 300}))[
            "terminationGracePeriodSeconds"
        ]
        == 300
    )


# ---------------------------------------------------------------- rollouts and pinning


def test_rotating_the_api_key_rolls_the_pods() -> None:
    """Before: the pod template did not change with the key, so pods kept the old one."""

    def annotations(key: str) -> dict:
        values = {**CASES["standalone-pvc"], "apiKey": {"value": key}}
        return render(values).one("Deployment")["spec"]["template"]["metadata"]["annotations"]

    assert annotations("old-key")["checksum/api-key"] != annotations("new-key")["checksum/api-key"]
    assert "old-key" not in str(annotations("old-key"))


def test_images_can_be_pinned_by_digest() -> None:
    """Before: no image.digest; a tag can be moved under a running deployment."""
    digest = CASES["standalone-pvc"]["image"]["digest"]
    images = {c["image"] for c in chart.containers(render("standalone-pvc")).values()}
    assert images == {f"{CASES['standalone-pvc']['image']['repository']}@{digest}"}
    bundle = CASES["sidecar-image"]["bundle"]["image"]
    copy = chart.containers(render("sidecar-image"))["copy-bundle"]
    assert copy["image"] == f"{bundle['repository']}@{bundle['digest']}"


# ---------------------------------------------------------------- what operators expect


OPERATOR_VALUES = {
    "extraVolumes": [{"name": "certs", "secret": {"secretName": "guard-certs"}}],
    "extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/certs", "readOnly": True}],
    "envFrom": [{"configMapRef": {"name": "guard-env"}}],
    "extraArgs": ["--verbose"],
    "priorityClassName": "ml-serving",
    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "autoscaling": {"enabled": True, "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}},
    "lifecycle": {"preStop": {"exec": {"command": ["sleep", "20"]}}},
    "shutdown": {"preStopSleepSeconds": 20},
    "serviceMonitor": {"enabled": True, "relabelings": [{"targetLabel": "team", "replacement": "ml"}]},
    "ingress": {"enabled": True, "className": "nginx", "hosts": [{"host": "guard.example.com"}]},
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gateways"}]},
}


@pytest.mark.parametrize("kube", ["1.28.0", "1.31.0"])
def test_the_values_operators_expect_land_where_they_should(kube: str) -> None:
    values = {**CASES["sidecar-url"], **OPERATOR_VALUES}
    manifests = chart.render(values, f"v{kube}", (chart.SERVICE_MONITOR_API,))
    for obj in manifests.objects:
        if obj["kind"] not in ("ServiceMonitor", "HTTPRoute"):  # CRDs: no schema in kubernetes-validate
            kubernetes_validate.validate(obj, kube, strict=True)
    spec = chart.pod_spec(manifests)
    guard = chart.containers(manifests)["guard"]
    assert {"name": "certs", "secret": {"secretName": "guard-certs"}} in spec["volumes"]
    assert OPERATOR_VALUES["extraVolumeMounts"][0] in guard["volumeMounts"]
    assert guard["envFrom"] == OPERATOR_VALUES["envFrom"] and guard["args"] == ["serve", "--verbose"]
    assert guard["lifecycle"] == OPERATOR_VALUES["lifecycle"]
    assert spec["priorityClassName"] == "ml-serving"
    assert manifests.one("Deployment")["spec"]["strategy"] == OPERATOR_VALUES["strategy"]
    assert manifests.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in manifests.one("PodDisruptionBudget")["spec"]
    assert manifests.one("HorizontalPodAutoscaler")["spec"]["behavior"] == OPERATOR_VALUES["autoscaling"]["behavior"]
    (endpoint,) = manifests.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["relabelings"] == OPERATOR_VALUES["serviceMonitor"]["relabelings"]
    service = manifests.one("Service")["metadata"]["name"]
    (rule,) = manifests.one("Ingress")["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": service, "port": {"name": "http"}}
    route = manifests.one("HTTPRoute")["spec"]
    assert route["parentRefs"] == OPERATOR_VALUES["httpRoute"]["parentRefs"]
    assert route["rules"][0]["backendRefs"] == [{"name": service, "port": chart.chart().values["port"]}]
