"""The KServe example (deploy/kserve) and the prometheus-adapter values (deploy/prometheus-adapter),
without a cluster: every setting, flag, path and metric they name is the guard's own."""

from __future__ import annotations

import re

import httpx
import pytest
import yaml

from guard.api import create_app
from guard.cli import _parser
from guard.server import GRACEFUL_SHUTDOWN_S
from guard.settings import Settings
from tests.deploy import chart, promql
from tests.deploy.conftest import ROOT
from tests.server_fixtures import StubBackend, build_stub_bundle, uvicorn_thread

KSERVE = ROOT / "deploy" / "kserve" / "backdoor-guard.yaml"
ADAPTER = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"


@pytest.fixture(scope="module")
def kserve() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KSERVE.read_text(encoding="utf-8"))}


def test_the_serving_runtime_runs_guard_serve_with_real_settings(kserve: dict[str, dict], tmp_path, clean_env) -> None:
    runtime = kserve["ServingRuntime"]["spec"]
    assert "v2" in runtime["protocolVersions"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container"  # where KServe's storage initializer mounts /mnt/models
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {name.removeprefix("GUARD_").lower() for name in env} <= set(Settings.model_fields)
    assert env["GUARD_BUNDLE"] == "/mnt/models"
    args = [a.replace("{{.Name}}", "sentiment-guard") for a in container["args"]]
    parsed = _parser().parse_args([*args, "--bundle", str(tmp_path)])
    assert vars(parsed)["model_name"] == "sentiment-guard"
    port = int(env["GUARD_PORT"])
    assert container["ports"] == [{"containerPort": port, "protocol": "TCP"}]

    settings = Settings(bundle=build_stub_bundle(tmp_path / "bundle"), log_json=False, access_log=False)
    with uvicorn_thread(create_app(settings, backend=StubBackend())) as url:
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] == port
            assert httpx.get(url + container[probe]["httpGet"]["path"]).status_code == 200, probe
    assert container["securityContext"]["runAsUser"] == 10001 and container["securityContext"]["readOnlyRootFilesystem"]


def test_the_inference_service_uses_the_runtime_and_drains(kserve: dict[str, dict]) -> None:
    predictor = kserve["InferenceService"]["spec"]["predictor"]
    runtime = kserve["ServingRuntime"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert predictor["model"]["modelFormat"]["name"] in formats
    (container,) = runtime["spec"]["containers"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert predictor["terminationGracePeriodSeconds"] >= pre_stop + GRACEFUL_SHUTDOWN_S


def test_the_adapter_serves_the_metric_the_charts_hpa_scales_on() -> None:
    (rule,) = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))["rules"]["custom"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series in promql.guard_series()
    values = {**chart.ci_values()["standalone-url"], "autoscaling": {"enabled": True, "metric": "pendingRequests"}}
    (metric,) = chart.render(values, "v1.31.0").one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
