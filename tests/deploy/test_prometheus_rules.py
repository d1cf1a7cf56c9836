"""The alert rules: promtool checks them and runs their unit tests (rules.test.yml, input
series with alerts expected and not), and every metric and label they use is the guard's.

Needs `promtool` (Debian package `prometheus`; `make test-deps`). Missing, it FAILS.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import chart, promql
from tests.deploy.conftest import ROOT, tool

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules.test.yml"
EXPECTED_ALERTS = {
    "GuardFalseRejectRateAboveTarget",
    "GuardBlockRateSpike",
    "GuardFailOpenPasses",
    "GuardNotReady",
    "GuardDown",
    "GuardLatencyP99OverBudget",
    "GuardFailClosedRefusals",
    "GuardFalseAcceptRateAboveCalibrated",
    "GuardQueueSaturated",
    "GuardUpstreamErrors",
}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    binary = tool("promtool", "run `make test-deps` (Debian/Ubuntu: apt-get install prometheus)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules_and_the_compose_prometheus_config() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = promtool("check", "config", "prometheus.yml")  # also loads the rule files it names
    assert config.returncode == 0 and "1 rule files found" in config.stdout, config.stdout + config.stderr


@pytest.mark.slow
def test_promtool_rule_unit_tests_pass() -> None:
    tested = promtool("test", "rules", RULES_TEST.name)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired, quiet = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts == EXPECTED_ALERTS
    assert fired == alerts and quiet == alerts


def test_rules_use_only_the_guards_metrics_and_labels() -> None:
    known = promql.guard_series()
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    for rule in _rules():
        assert promql.unknown_references(rule["expr"], known) == [], rule.get("alert") or rule.get("record")
        used = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", rule["expr"]))
        assert used <= recorded, f"{rule.get('alert')} uses unrecorded {used - recorded}"
        assert 'job="backdoor-guard"' in rule["expr"] or used, rule  # scoped to the guard's job


@pytest.mark.parametrize("case", yaml.safe_load(RULES_TEST.read_text())["tests"], ids=lambda c: c["name"][:40])
def test_rule_test_inputs_are_series_the_guard_really_exposes(case: dict) -> None:
    known = promql.guard_series() | {"up": promql.TARGET_LABELS}
    for series in case["input_series"]:
        name, _, matchers = series["series"].partition("{")
        labels = set(re.findall(r"(\w+)=", matchers))
        assert name in known, f"{name} is not a guard metric"
        assert labels <= known[name], f"{name}: no label(s) {sorted(labels - known[name])}"
        assert labels >= promql.TARGET_LABELS


PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"


def test_the_charts_prometheus_rule_selects_the_releases_own_job(tmp_path: Path) -> None:
    """Before: the rules hard-coded job="backdoor-guard", which a nameOverride (the job the
    ServiceMonitor gives the targets) silently left without data. The chart's PrometheusRule
    is rules.yml with the release's job."""
    values = {**chart.ci_values()["standalone-url"], "nameOverride": "sentiment-guard"}
    manifests = chart.render(values, "v1.31.0", (PROMETHEUS_RULE_API, chart.SERVICE_MONITOR_API))
    groups = manifests.one("PrometheusRule")["spec"]["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    assert len(exprs) == len(_rules()) and all('job="backdoor-guard"' not in e for e in exprs)
    assert sum('job="sentiment-guard"' in e for e in exprs) == sum(
        'job="backdoor-guard"' in r["expr"] for r in _rules()
    )
    monitor = manifests.one("ServiceMonitor")["spec"]
    assert manifests.one("Service")["metadata"]["labels"][monitor["jobLabel"]] == "sentiment-guard"
    rendered = tmp_path / "rendered-rules.yml"
    rendered.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    checked = promtool("check", "rules", str(rendered))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    default = chart.render(chart.ci_values()["standalone-url"], "v1.31.0", (PROMETHEUS_RULE_API,))
    assert default.one("PrometheusRule")["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert "PrometheusRule" not in chart.render(chart.ci_values()["standalone-url"], "v1.31.0").kinds()  # no CRD


def test_the_dashboard_config_map_holds_the_dashboard() -> None:
    values = {**chart.ci_values()["standalone-url"], "grafanaDashboard": {"enabled": True}}
    config_maps = {c["metadata"]["name"]: c for c in chart.render(values, "v1.31.0").of_kind("ConfigMap")}
    dashboard = config_maps[f"{chart.RELEASE}-backdoor-guard-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = ROOT / "deploy" / "grafana" / "dashboards" / "backdoor-guard.json"
    assert json.loads(dashboard["data"]["backdoor-guard.json"]) == json.loads(on_disk.read_text())
