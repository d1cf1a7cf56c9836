"""The local stack (deploy/compose.yaml) without Docker: every file it mounts or builds from
exists, Prometheus and Grafana are pointed at each other and at the provisioned files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def _binds(service: dict) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) of the bind mounts with a fixed source."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith("${"):
            mounts[target] = source
    return mounts


def test_the_stack_has_the_guard_prometheus_and_grafana(compose: dict) -> None:
    assert set(compose["services"]) == {"guard", "prometheus", "grafana"}


def test_the_guard_is_built_from_the_dockerfile_and_runs_read_only(compose: dict) -> None:
    guard = compose["services"]["guard"]
    context = (DEPLOY / guard["build"]["context"]).resolve()
    assert context == ROOT and (context / guard["build"]["dockerfile"]).is_file()
    assert guard["read_only"] is True and guard["tmpfs"] == ["/tmp"] and guard["cap_drop"] == ["ALL"]
    assert any(v.endswith(":/bundle:ro") for v in guard["volumes"])  # the image's GUARD_BUNDLE
    assert all(name.startswith("GUARD_") for name in guard["environment"])


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_every_mounted_file_exists(compose: dict, service: str) -> None:
    for source in _binds(compose["services"][service]).values():
        assert (DEPLOY / source).exists(), source


def test_prometheus_loads_the_mounted_config_and_rules(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    binds = _binds(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    config = yaml.safe_load((DEPLOY / binds[config_path]).read_text())
    (rule_file,) = config["rule_files"]
    assert str(Path(config_path).parent / rule_file) in binds  # the rules sit where the config says
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "backdoor-guard" and job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_scrapes_the_guards_metrics_port_not_its_service_port(compose: dict) -> None:
    """The RAP score histogram (the dashboard's heatmap) is served on metrics_port only; scraping
    guard:8000 left the heatmap empty (issue 32)."""
    guard = compose["services"]["guard"]
    service_port = int(guard["ports"][0].split(":")[-1])
    metrics_port = int(guard["environment"]["GUARD_METRICS_PORT"])
    assert metrics_port != service_port
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"guard:{metrics_port}"]
    assert all(not p.endswith(f":{metrics_port}") for p in guard["ports"])  # only the service port is published


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    binds = _binds(grafana)
    provisioning = DEPLOY / binds["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "backdoor-guard.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (DEPLOY / binds[dashboards_dir] / "backdoor-guard.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/backdoor-guard.json"
