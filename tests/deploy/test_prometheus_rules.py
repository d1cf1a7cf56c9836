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


# Every series selector in a PromQL expression: guard metrics, recorded series (level:metric:ops)
# and `up`, with their {matchers}. Function names, `by (...)` labels and durations are left out.
_SERIES = re.compile(r"(?<![\w:])(up|guard_\w+|\w+:\w+:\w+)(?![\w:(])\s*(\{[^}]*\})?")


def _selectors(expr: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2) or "") for m in _SERIES.finditer(expr)]


def test_every_selector_of_every_rule_names_the_guards_job() -> None:
    """What the chart replaces per release: a selector without the job would read every release's series."""
    for rule in _rules():
        found = _selectors(rule["expr"])
        assert found, rule
        for name, matchers in found:
            assert 'job="backdoor-guard"' in matchers, f"{rule.get('alert') or rule.get('record')}: {name}{matchers}"


def _release_rules(release: str, namespace: str) -> tuple[list[dict], dict]:
    values = {**chart.ci_values()["standalone-url"], "nameOverride": "sentiment-guard"}
    manifests = chart.render(values, "v1.31.0", (PROMETHEUS_RULE_API, chart.SERVICE_MONITOR_API), release, namespace)
    groups = manifests.one("PrometheusRule")["spec"]["groups"]
    return [rule for group in groups for rule in group["rules"]], manifests.one("Service")


RELEASES = [("guard", "ml"), ("canary", "ml"), ("guard", "team-b")]


def test_two_releases_rules_never_read_or_write_each_others_series(tmp_path: Path) -> None:
    """Before: every release's rules selected job="backdoor-guard" (the chart name), so recorded
    series collided, alerts aggregated across releases and GuardDown stayed silent while any other
    release was up. Now each release's selectors name its own job (the Service's name, which the
    ServiceMonitor makes the job) and namespace, and its recorded series carry the namespace."""
    written: dict[tuple, str] = {}
    for release, namespace in RELEASES:
        rules, service = _release_rules(release, namespace)
        scope = f'job="{service["metadata"]["name"]}", namespace="{namespace}"'
        assert len(rules) == len(_rules())
        for rule in rules:
            for name, matchers in _selectors(rule["expr"]):
                assert scope in matchers, f"{release}/{namespace} {rule.get('alert') or rule.get('record')}: {name}"
            if "record" in rule:
                key = (rule["record"], service["metadata"]["name"], rule["labels"]["namespace"])
                assert key not in written, f"{release}/{namespace} writes {key}, as {written.get(key)} does"
                written[key] = f"{release}/{namespace}"
        (down,) = [r for r in rules if r.get("alert") == "GuardDown"]
        assert down["expr"] == f"absent(up{{{scope}}} == 1)"
        rendered = tmp_path / f"{release}-{namespace}.yml"
        rendered.write_text(yaml.safe_dump({"groups": [{"name": "r", "rules": rules}]}), encoding="utf-8")
        checked = promtool("check", "rules", str(rendered))
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_charts_prometheus_rule_is_rules_yml_scoped_to_the_release() -> None:
    manifests = chart.render(chart.ci_values()["standalone-url"], "v1.31.0", (PROMETHEUS_RULE_API,))
    expected = RULES.read_text().replace(
        'job="backdoor-guard"', f'job="{chart.RELEASE}-backdoor-guard", namespace="ml"'
    )
    groups = yaml.safe_load(expected)["groups"]
    for group in groups:
        for rule in group["rules"]:
            if "record" in rule:
                rule["labels"] = {"namespace": chart.NAMESPACE}
    assert manifests.one("PrometheusRule")["spec"]["groups"] == groups
    assert "PrometheusRule" not in chart.render(chart.ci_values()["standalone-url"], "v1.31.0").kinds()  # no CRD


def test_the_dashboard_config_map_holds_the_dashboard() -> None:
    values = {**chart.ci_values()["standalone-url"], "grafanaDashboard": {"enabled": True}}
    config_maps = {c["metadata"]["name"]: c for c in chart.render(values, "v1.31.0").of_kind("ConfigMap")}
    dashboard = config_maps[f"{chart.RELEASE}-backdoor-guard-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = ROOT / "deploy" / "grafana" / "dashboards" / "backdoor-guard.json"
    assert json.loads(dashboard["data"]["backdoor-guard.json"]) == json.loads(on_disk.read_text())
