"""The Helm chart, without a cluster: Helm 4 (helm-python-sdk) lints and renders it for both
topologies and every ci/ values file, on Kubernetes versions before and after native
sidecars, with and without the ServiceMonitor CRD; every rendered object is validated
against that version's Kubernetes schema (kubernetes-validate, strict: unknown fields fail).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import helm_python as helm
import httpx
import kubernetes_validate
import pytest
import yaml

from guard.api import create_app
from guard.server import metrics_server
from guard.settings import Settings
from tests.deploy import chart
from tests.deploy.chart import SERVICE_MONITOR_API
from tests.deploy.conftest import ROOT
from tests.server_fixtures import (
    CLEAN,
    TRIGGERED,
    StubBackend,
    build_stub_bundle,
    free_port,
    uvicorn_thread,
    wait_http,
)

CASES = chart.ci_values()
KUBE_VERSIONS = ("1.28.0", "1.31.0")  # without and with native sidecars (1.29+)
CAPABILITIES = {"no-crd": (), "servicemonitor-crd": (SERVICE_MONITOR_API,)}
# Settings the chart sets itself (environment), so `settings:` may not carry them.
CHART_OWNED = {"bundle", "host", "port", "metrics_port", "upstream", "api_key", "config", "feedback_api_key"}
# Setting values the serving image cannot honour: it has no torch (tests/deploy/test_image.py).
IMAGE_LACKS = {"backend": {"torch"}}
MATRIX = [
    pytest.param(case, kube, api, id=f"{case}-k{kube[:4]}-{api}")
    for case in CASES
    for kube in KUBE_VERSIONS
    for api in CAPABILITIES
]


def render(case: str | dict, kube: str = "1.31.0", apis: tuple[str, ...] = ()) -> chart.Manifests:
    values = CASES[case] if isinstance(case, str) else case
    return chart.render(values, f"v{kube}", apis)


def test_every_topology_and_bundle_source_has_a_ci_case() -> None:
    assert {v["topology"] for v in CASES.values()} == {"standalone", "sidecar"}
    assert {v["bundle"]["source"] for v in CASES.values()} == {"pvc", "url", "image"}
    assert {v.get("autoscaling", {}).get("metric") for v in CASES.values()} >= {"cpu", "pendingRequests"}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict_is_clean(case: str, kube: str) -> None:
    assert chart.lint(CASES[case], f"v{kube}") == []


@pytest.mark.parametrize(("case", "kube", "api"), MATRIX)
def test_every_rendered_object_is_valid_for_its_kubernetes_version(case: str, kube: str, api: str) -> None:
    manifests = render(case, kube, CAPABILITIES[api])
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Pod"} <= manifests.kinds()
    for obj in manifests.objects:
        if obj["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema for it
            _check_service_monitor(obj, manifests)
            continue
        kubernetes_validate.validate(obj, kube, strict=True)
    assert ("ServiceMonitor" in manifests.kinds()) == (api == "servicemonitor-crd")


def test_the_validator_is_strict() -> None:
    """A typo in a rendered object must fail validation: this is what catches template slips."""
    deployment = copy.deepcopy(render("standalone-pvc").one("Deployment"))
    guard = deployment["spec"]["template"]["spec"]["containers"][0]
    guard["livenesProbe"] = guard.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, "1.31.0", strict=True)


def _check_service_monitor(monitor: dict, manifests: chart.Manifests) -> None:
    service = manifests.one("Service")
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [chart.NAMESPACE]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    # No jobLabel: job is the Service's name, which the PrometheusRule selects (tests/deploy/test_prometheus_rules.py).
    assert "jobLabel" not in spec


# ---------------------------------------------------------------- topologies


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["topology"] == "standalone"])
def test_standalone_serves_the_classifier_itself(case: str) -> None:
    manifests = render(case)
    spec = chart.pod_spec(manifests)
    assert [c["name"] for c in spec["containers"]] == ["guard"]
    assert "GUARD_UPSTREAM" not in chart.env(spec["containers"][0])


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["topology"] == "sidecar"])
def test_sidecar_is_native_from_kubernetes_1_29(case: str) -> None:
    port = CASES[case]["sidecar"]["upstreamPort"]
    native = chart.pod_spec(render(case, "1.29.0"))
    guard = native["initContainers"][-1]
    assert guard["name"] == "guard" and guard["restartPolicy"] == "Always"
    assert [c["name"] for c in native["containers"]] == [CASES[case]["sidecar"]["classifier"].get("name", "classifier")]
    assert chart.env(guard)["GUARD_UPSTREAM"] == f"http://127.0.0.1:{port}"

    older = chart.pod_spec(render(case, "1.28.0"))
    assert "guard" not in {c["name"] for c in older["initContainers"]}
    assert [c["name"] for c in older["containers"]][0] == "guard"
    assert all("restartPolicy" not in c for c in older["containers"] + older["initContainers"])
    assert chart.env(older["containers"][0])["GUARD_UPSTREAM"] == f"http://127.0.0.1:{port}"


def test_sidecar_keeps_the_classifier_container_as_given_plus_a_pre_stop_delay() -> None:
    """Only a preStop delay is added (so it outlives the guard's drain), and only if it has none."""
    given = CASES["sidecar-url"]["sidecar"]["classifier"]
    (classifier,) = [c for c in chart.pod_spec(render("sidecar-url"))["containers"] if c["name"] == given["name"]]
    assert {k: v for k, v in classifier.items() if k != "lifecycle"} == given
    assert set(classifier["lifecycle"]) == {"preStop"}
    own = {**given, "lifecycle": {"preStop": {"httpGet": {"path": "/drain", "port": 8080}}}}
    values = {**CASES["sidecar-url"], "sidecar": {**CASES["sidecar-url"]["sidecar"], "classifier": own}}
    (kept,) = [c for c in chart.pod_spec(render(values))["containers"] if c["name"] == given["name"]]
    assert kept == own


# ---------------------------------------------------------------- bundle delivery


def test_bundle_from_a_pvc_is_mounted_read_only_and_verified() -> None:
    spec = chart.pod_spec(render("standalone-pvc"))
    (volume,) = [v for v in spec["volumes"] if v["name"] == "bundle"]
    assert volume["persistentVolumeClaim"] == {"claimName": "guard-bundles", "readOnly": True}
    assert [c["name"] for c in spec["initContainers"]] == ["verify-bundle"]
    for container in (spec["initContainers"][0], spec["containers"][0]):
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "bundle"]
        assert mount == {"name": "bundle", "mountPath": "/bundle", "readOnly": True, "subPath": "sst2-minilm"}


@pytest.mark.parametrize(("case", "first"), [("standalone-url", "fetch-bundle"), ("sidecar-image", "copy-bundle")])
def test_fetched_bundles_land_in_an_empty_dir_before_verification(case: str, first: str) -> None:
    spec = chart.pod_spec(render(case, "1.28.0"))
    (volume,) = [v for v in spec["volumes"] if v["name"] == "bundle"]
    assert "emptyDir" in volume
    assert [c["name"] for c in spec["initContainers"]] == [first, "verify-bundle"]
    writer = spec["initContainers"][0]
    # Not at the image's bundle path (/bundle): an emptyDir there would hide the image's files.
    assert {"name": "bundle", "mountPath": "/guard-bundle-out"} in writer["volumeMounts"]


def test_the_fetch_container_runs_the_script_with_the_pinned_checksum() -> None:
    manifests = render("standalone-url")
    fetch = chart.containers(manifests)["fetch-bundle"]
    url = CASES["standalone-url"]["bundle"]["url"]
    assert fetch["command"] == ["python", "/etc/backdoor-guard/fetch_bundle.py"]
    assert fetch["args"] == ["--url", url["location"], "--sha256", url["sha256"], "--into", "/guard-bundle-out"]
    script = chart.settings_config_map(manifests)["data"]["fetch_bundle.py"]
    assert script == (chart.CHART / "files" / "fetch_bundle.py").read_text(encoding="utf-8")


def test_the_verify_container_runs_the_real_cli(tmp_path: Path) -> None:
    """The verify init container's arguments, given to this checkout's `guard` CLI: a tampered bundle fails."""
    verify_args = {tuple(chart.containers(render(case))["verify-bundle"]["args"]) for case in CASES}
    assert verify_args == {("verify", "--bundle", "/bundle")}
    assert {tuple(chart.containers(render(case))["guard"]["args"]) for case in CASES} == {("serve",)}
    args = list(verify_args.pop())
    bundle = build_stub_bundle(tmp_path / "bundle")
    done = subprocess.run([sys.executable, "-m", "guard.cli", *args[:-1], str(bundle)], capture_output=True, text=True)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
    (bundle / "tokenizer.json").write_text("{}")
    tampered = subprocess.run([sys.executable, "-m", "guard.cli", *args[:-1], str(bundle)], capture_output=True)
    assert tampered.returncode != 0


# ---------------------------------------------------------------- security, probes, scaling


@pytest.mark.parametrize(("case", "kube"), [(c, k) for c in CASES for k in KUBE_VERSIONS])
def test_every_chart_container_is_locked_down(case: str, kube: str) -> None:
    manifests = render(case, kube)
    classifier = CASES[case].get("sidecar", {}).get("classifier", {}).get("name", "classifier")
    pods = [chart.pod_spec(manifests), manifests.one("Pod")["spec"]]
    for spec in pods:
        assert spec["automountServiceAccountToken"] is False
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == classifier and CASES[case]["topology"] == "sidecar":
                continue  # the user's container, left as given
            context = container["securityContext"]  # the container's own: true in either topology
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001, container["name"]
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]


def test_probes_point_at_the_guards_health_endpoints() -> None:
    guard = chart.containers(render("standalone-pvc"))["guard"]
    assert guard["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert guard["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert guard["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert guard["startupProbe"]["periodSeconds"] * guard["startupProbe"]["failureThreshold"] >= 300


def test_probes_and_the_helm_test_hook_work_against_a_real_guard(tmp_path: Path) -> None:
    """The rendered probe paths and the `helm test` pod's own command, run against a live server."""
    manifests = render("standalone-pvc")
    guard = chart.containers(manifests)["guard"]
    hook = manifests.one("Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (command,) = [c["command"] for c in hook["spec"]["containers"]]
    service = manifests.one("Service")
    service_url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/readyz"
    assert command[0] == "python" and command[-1] == service_url

    settings = Settings(bundle=build_stub_bundle(tmp_path / "bundle"), log_json=False, access_log=False)
    with uvicorn_thread(create_app(settings, backend=StubBackend())) as url:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert httpx.get(url + guard[probe]["httpGet"]["path"]).status_code == 200, probe
        local = [sys.executable, *command[1:-1], f"{url}/readyz"]
        done = subprocess.run(local, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and '"ready"' in done.stdout, done.stderr
    gone = subprocess.run([sys.executable, *command[1:-1], f"{url}/readyz"], capture_output=True, timeout=30)
    assert gone.returncode != 0


def test_autoscaling_on_cpu_or_on_the_guards_queue() -> None:
    cpu = render("standalone-pvc").one("HorizontalPodAutoscaler")["spec"]
    assert cpu["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}
    ]
    assert cpu["scaleTargetRef"]["kind"] == "Deployment"
    queue = render("standalone-url").one("HorizontalPodAutoscaler")["spec"]
    assert queue["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "guard_pending_requests"},
                "target": {"type": "AverageValue", "averageValue": "16"},
            },
        }
    ]
    # With an HPA the Deployment leaves replicas to it.
    assert "replicas" not in render("standalone-pvc").one("Deployment")["spec"]
    fixed = render({**CASES["standalone-pvc"], "autoscaling": {"enabled": False}})
    assert fixed.one("Deployment")["spec"]["replicas"] == 2


CPU_HPA = {"enabled": True, "metric": "cpu", "targetCPUUtilizationPercentage": 70}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_the_sidecar_cpu_hpa_scales_on_the_guard_container(kube: str) -> None:
    """Before: a pod-level Resource metric, which the HPA cannot compute when the classifier
    container has no CPU request (it then never scales)."""
    classifier = {"name": "sentiment", "image": "registry.example.com/sentiment-classifier:1.4.2"}
    values = {**CASES["sidecar-url"], "sidecar": {"classifier": classifier}, "autoscaling": CPU_HPA}
    hpa = render(values, kube).one("HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, kube, strict=True)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "ContainerResource",
            "containerResource": {
                "name": "cpu",
                "container": "guard",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]


def test_the_chart_refuses_a_cpu_hpa_that_cannot_be_computed() -> None:
    # null deletes a default value in Helm: no CPU request nor limit left.
    no_request = {**CASES["standalone-pvc"], "resources": {"requests": {"cpu": None}, "limits": {"cpu": None}}}
    with pytest.raises(helm.HelmError, match="needs resources.requests.cpu"):
        render(no_request)
    # A limit alone is a request too (Kubernetes copies it).
    limit_only = {**CASES["standalone-pvc"], "resources": {"requests": {"cpu": None}}}
    assert render(limit_only).one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["type"] == "Resource"
    # Before 1.27 (no ContainerResource by default) the pod's utilisation needs the classifier's request.
    bare = {"name": "sentiment", "image": "registry.example.com/sentiment-classifier:1.4.2"}
    sidecar = {**CASES["sidecar-url"], "autoscaling": CPU_HPA}
    with pytest.raises(helm.HelmError, match="needs a CPU request on sidecar.classifier"):
        render({**sidecar, "sidecar": {"classifier": bare}}, "1.26.0")
    pod_level = render(sidecar, "1.26.0").one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert pod_level[0]["type"] == "Resource"


def test_pod_disruption_budget_selects_the_pods_and_can_be_turned_off() -> None:
    manifests = render("standalone-pvc")
    pdb = manifests.one("PodDisruptionBudget")["spec"]
    labels = manifests.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    assert "PodDisruptionBudget" not in render("sidecar-image").kinds()


def test_service_monitor_needs_the_crd_and_can_be_turned_off() -> None:
    assert "ServiceMonitor" not in render("standalone-url").kinds()
    monitor = render("standalone-url", apis=(SERVICE_MONITOR_API,)).one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    values = {**CASES["standalone-url"], "serviceMonitor": {"enabled": False}}
    assert "ServiceMonitor" not in render(values, apis=(SERVICE_MONITOR_API,)).kinds()
    assert 'no ServiceMonitor CRD here; scrape port "metrics" (9464;' in render("standalone-url").notes


def _scraped_container_port(manifests: chart.Manifests) -> int:
    """The guard container's port the ServiceMonitor scrapes: endpoint -> Service port -> targetPort."""
    (endpoint,) = manifests.one("ServiceMonitor")["spec"]["endpoints"]
    service_port = next(p for p in manifests.one("Service")["spec"]["ports"] if p["name"] == endpoint["port"])
    guard = chart.containers(manifests)["guard"]
    return next(p["containerPort"] for p in guard["ports"] if p["name"] == service_port["targetPort"])


def test_by_default_prometheus_scrapes_the_metrics_port_which_serves_the_heatmaps_metric(tmp_path: Path) -> None:
    """Before (issue 32): metricsPort null, so the ServiceMonitor scraped the service port, whose
    /metrics never holds the RAP score histogram the dashboard's heatmap draws: an empty heatmap."""
    manifests = render({"bundle": {"pvc": {"claimName": "bundles"}}}, apis=(SERVICE_MONITOR_API,))
    env = chart.env(chart.containers(manifests)["guard"])
    scraped = _scraped_container_port(manifests)
    assert scraped != int(env["GUARD_PORT"]) and scraped == int(env["GUARD_METRICS_PORT"])
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "backdoor-guard.json").read_text())
    (heatmap,) = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    (metric,) = set(re.findall(r"\b(guard_\w+)_bucket\b", heatmap["targets"][0]["expr"]))

    # The guard as rendered, its ports moved to free ones (a pod has a network namespace of its own).
    settings = Settings(
        bundle=build_stub_bundle(tmp_path / "bundle"), metrics_port=free_port(), log_json=False, access_log=False
    )
    app = create_app(settings, backend=StubBackend())
    with uvicorn_thread(app) as url, metrics_server(app, settings):
        assert httpx.post(f"{url}/v1/check", json={"texts": [CLEAN, TRIGGERED]}).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 404  # not on the clients' port
        wait_http(f"http://127.0.0.1:{settings.metrics_port}/metrics")
        exposition = httpx.get(f"http://127.0.0.1:{settings.metrics_port}/metrics").text
    assert f"{metric}_bucket{{" in exposition


def test_the_metrics_port_cannot_be_a_port_the_pod_already_uses() -> None:
    with pytest.raises(helm.HelmError, match="metricsPort 8000 is also the guard's port"):
        render({**CASES["standalone-pvc"], "metricsPort": 8000})
    sidecar = CASES["sidecar-url"]
    with pytest.raises(helm.HelmError, match="sidecar.upstreamPort"):
        render({**sidecar, "metricsPort": sidecar["sidecar"]["upstreamPort"]})


def test_service_selects_the_pods_on_the_guards_port() -> None:
    manifests = render("sidecar-url")
    service = manifests.one("Service")["spec"]
    labels = manifests.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    guard = chart.containers(manifests)["guard"]
    assert service["ports"][0]["targetPort"] in {p["name"] for p in guard["ports"]}


# ---------------------------------------------------------------- settings and secrets


@pytest.mark.parametrize("case", CASES)
def test_the_settings_config_map_is_accepted_by_the_guard(case: str, tmp_path: Path, clean_env: None) -> None:
    manifests = render(case)
    config = tmp_path / "guard.yaml"
    config.write_text(chart.settings_config_map(manifests)["data"]["guard.yaml"], encoding="utf-8")
    environment = chart.env(chart.containers(manifests)["guard"])
    settings = Settings(bundle=build_stub_bundle(tmp_path / "bundle"), config=config)
    for name, value in CASES[case].get("settings", {}).items():
        assert getattr(settings, name) == value, name
    # Every GUARD_* variable the chart sets names a real setting.
    assert {name.removeprefix("GUARD_").lower() for name in environment} <= set(Settings.model_fields)
    assert environment["GUARD_CONFIG"] == f"/etc/backdoor-guard/{config.name}"


def test_config_changes_roll_the_pods() -> None:
    before = render("standalone-pvc").one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    changed = {**CASES["standalone-pvc"], "settings": {"mode": "shadow"}}
    after = render(changed).one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/config"] != after["checksum/config"]


def test_values_schema_lists_exactly_the_guards_own_settings() -> None:
    properties = chart.chart().schema["properties"]["settings"]["properties"]
    assert set(properties) == set(Settings.model_fields) - CHART_OWNED
    for name, rule in properties.items():
        if "enum" in rule:
            annotation = Settings.model_fields[name].annotation
            literals = {a for arg in typing.get_args(annotation) for a in (typing.get_args(arg) or [arg])}
            literals -= IMAGE_LACKS.get(name, set())
            assert set(rule["enum"]) - {None} == literals - {type(None)}, name


def test_api_key_from_a_value_or_an_existing_secret() -> None:
    manifests = render("standalone-pvc")
    secret = manifests.one("Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "s3cr3t-token"
    key_ref = chart.env(chart.containers(manifests)["guard"])["GUARD_API_KEY"]
    assert key_ref == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "api-key"}}

    existing = render("standalone-url")
    assert "Secret" not in existing.kinds()
    key_ref = chart.env(chart.containers(existing)["guard"])["GUARD_API_KEY"]
    assert key_ref == {"secretKeyRef": {"name": "guard-api", "key": "token"}}

    assert "GUARD_API_KEY" not in chart.env(chart.containers(render("sidecar-url"))["guard"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topology": "mesh"}, "/topology"),
        ({"settings": {"bundle": "/elsewhere"}}, "additional properties 'bundle' not allowed"),
        ({"settings": {"mode": "block"}}, "/settings/mode"),
        ({"settings": {"frr": 1.5}}, "/settings/frr"),
        ({"bundle": {"source": "pvc", "pvc": {"claimName": ""}}}, "/bundle/pvc/claimName"),
        (
            {"bundle": {"source": "url", "url": {"location": "ftp://x/b.tgz", "sha256": "a" * 64}}},
            "/bundle/url/location",
        ),
        (
            {"bundle": {"source": "url", "url": {"location": "http://x/b.tgz", "sha256": "a" * 64}}},
            "/bundle/url/location",
        ),
        ({"bundle": {"source": "url", "url": {"location": "https://x/b.tgz"}}}, "/bundle/url/sha256"),
        ({"settings": {"backend": "torch"}}, "/settings/backend"),
        ({"image": {"repository": "r", "digest": "latest"}}, "/image/digest"),
        ({"bundle": {"source": "url", "url": {"location": "https://x/b.tgz", "sha256": "abc"}}}, "sha256"),
        ({"topology": "sidecar", "sidecar": {"classifier": {"name": "c"}}}, "missing property 'image'"),
        ({"autoscaling": {"metric": "memory"}}, "/autoscaling/metric"),
    ],
)
def test_the_values_schema_rejects_mistakes(change: dict, message: str) -> None:
    values = {**CASES["standalone-pvc"], **change}
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)


def test_default_values_need_a_bundle() -> None:
    """Nothing sensible deploys without a bundle: the defaults alone are refused with a pointer to it."""
    with pytest.raises(helm.HelmValuesError, match="claimName"):
        render({})
    rendered = render({"bundle": {"pvc": {"claimName": "bundles"}}})
    assert yaml.safe_load(chart.settings_config_map(rendered)["data"]["guard.yaml"]) == chart.chart().values["settings"]


def test_the_operator_guides_sidecar_example_renders_and_validates() -> None:
    readme = (ROOT / "docs" / "operator" / "helm.md").read_text(encoding="utf-8")
    block = next(b for b in readme.split("```yaml\n")[1:] if b.startswith("# sidecar-values.yaml"))
    values = yaml.safe_load(block.split("```")[0])
    for kube in KUBE_VERSIONS:
        manifests = render(values, kube)
        for obj in manifests.objects:
            kubernetes_validate.validate(obj, kube, strict=True)
        assert chart.containers(manifests)["guard"] and chart.containers(manifests)["sentiment"]
