"""The Grafana dashboard: well-formed, every panel wired to the data source variable, and
every query run for real: a real Prometheus (with the alert rules loaded) scrapes a real
guard server in sidecar mode after traffic that touches every metric, and each panel
query must parse and return data; each rule must evaluate without error.

Needs the `prometheus` and `promtool` binaries (`make test-deps`); missing, it FAILS.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from guard.api import create_app
from guard.server import metrics_server
from guard.settings import Settings
from tests.deploy import promql
from tests.deploy.conftest import ROOT, tool
from tests.server_fixtures import (
    CLEAN,
    NEGATIVE,
    TRIGGERED,
    StubBackend,
    build_stub_bundle,
    free_port,
    running_echo_upstream,
    running_prometheus,
    uvicorn_thread,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "backdoor-guard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
GRID_COLUMNS = 24
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval"}
# Grafana's variables, as the live test resolves them.
SUBSTITUTIONS = {"$job": promql.JOB, "$instance": ".*", "$__rate_interval": "30s", "$__range": "2m"}
QUERY_DEADLINE_S = 30
LABELLER = {"Authorization": "Bearer labeller"}  # feedback is off without feedback_api_key


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p["targets"]]


def _resolve(expr: str) -> str:
    for variable in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(variable, SUBSTITUTIONS[variable])
    return expr


def test_every_panel_has_the_data_source_variable_and_queries(dashboard: dict) -> None:
    assert dashboard["uid"] == "backdoor-guard" and dashboard["panels"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used <= variables | BUILTIN_VARIABLES, f"{panel['title']}: undefined {used - variables}"
            assert 'job="$job"' in target["expr"], f"{panel['title']}: not scoped to the job variable"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict) -> None:
    taken: set[tuple[int, int]] = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_COLUMNS, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_the_dashboard_shows_what_the_issue_asks_for(dashboard: dict) -> None:
    def panel_using(pattern: str) -> list[str]:
        return [title for title, expr in _exprs(dashboard) if re.search(pattern, expr)]

    assert panel_using(r"sum by \(decision\) \(rate\(guard_requests_total")  # request rate by decision
    assert panel_using(r"histogram_quantile\(0\.5, sum by \(le, pass\) \(rate\(guard_inference_duration")
    assert panel_using(r"histogram_quantile\(0\.99, sum by \(le, pass\) \(rate\(guard_inference_duration")
    assert panel_using(r"guard_batch_size_") and panel_using(r"guard_pending_requests")
    assert panel_using(r"sum by \(reason\) \(rate\(guard_rejections_total")  # 429s, fail-closed 503s, ...
    for live, calibrated in (("false_reject_ratio", "calibrated_frr"), ("false_accept_ratio", "calibrated_far")):
        (title,) = set(panel_using(f"guard_{live}"))
        assert panel_using(f"guard_{calibrated}") == [title]  # live and calibrated on one panel
    (heatmap,) = [p for p in _panels(dashboard) if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap" and "guard_rap_score_bucket" in heatmap["targets"][0]["expr"]


def test_every_query_uses_the_guards_metrics_and_labels(dashboard: dict) -> None:
    known = promql.guard_series()
    for title, expr in _exprs(dashboard):
        assert promql.unknown_references(expr, known) == [], title


def test_promtool_parses_every_query(dashboard: dict, tmp_path: Path) -> None:
    """Each query, variables resolved, as a recording rule: `promtool check rules` parses its PromQL."""
    rules = [
        {"record": f"dashboard:query:{i}", "expr": _resolve(expr)} for i, (_, expr) in enumerate(_exprs(dashboard))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    promtool = tool("promtool", "run `make test-deps` (Debian/Ubuntu: apt-get install prometheus)")
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with running_echo_upstream() as url:
        yield url


def _send_traffic(url: str, backend: StubBackend) -> None:
    """Touch every metric: allow and block, feedback both ways, a fail-open pass, a proxied call."""
    with httpx.Client(base_url=url, timeout=30) as http:
        checked = http.post("/v1/check", json={"texts": [CLEAN, TRIGGERED, NEGATIVE]})
        assert checked.status_code == 200, checked.text
        decision = checked.json()["decision_id"]
        poisoned = http.post("/v1/check", json={"text": TRIGGERED}).json()["decision_id"]
        for decision_id, truth in ((decision, False), (poisoned, True)):
            answer = http.post("/v1/feedback", json={"decision_id": decision_id, "poisoned": truth}, headers=LABELLER)
            assert answer.status_code == 200, answer.text
        proxied = http.post("/classify", json={"inputs": CLEAN})
        assert proxied.status_code == 200, proxied.text
        assert http.post("/v1/check", json={"texts": []}).status_code == 422  # an error answer, counted by reason
        backend.fail_pass2 = RuntimeError("pass 2 is down")
        try:
            unchecked = http.post("/v1/check", json={"text": CLEAN})
            assert unchecked.headers["x-guard-failure-mode"].startswith("open"), unchecked.headers
        finally:
            backend.fail_pass2 = None


def _query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


@pytest.mark.slow
def test_every_query_returns_data_from_a_real_guard(dashboard: dict, upstream: str, tmp_path: Path) -> None:
    """Scraped on metrics_port, as a deployment that wants the delta heatmap must be (it is served there only)."""
    backend = StubBackend()
    settings = Settings(
        bundle=build_stub_bundle(tmp_path / "bundle"),
        upstream=upstream,
        failure_mode="open",
        access_log=False,
        metrics_port=free_port(),
        feedback_api_key="labeller",
        live_rates_min_observations=1,  # one feedback each way, and the live FAR/FRR panels have data
    )
    binary = tool("prometheus", "run `make test-deps` (Debian/Ubuntu: apt-get install prometheus)")
    app = create_app(settings, backend=backend)
    scraped = f"http://{settings.host}:{settings.metrics_port}"
    with (
        uvicorn_thread(app) as url,
        metrics_server(app, settings),
        running_prometheus(binary, scraped, tmp_path, promql.JOB, rule_files=[RULES]) as prometheus,
    ):
        deadline = time.monotonic() + QUERY_DEADLINE_S
        while not _query(prometheus, f'up{{job="{promql.JOB}"}} == 1') and time.monotonic() < deadline:
            time.sleep(0.2)
        _send_traffic(url, backend)
        pending = {expr: title for title, expr in _exprs(dashboard)}
        while pending and time.monotonic() < deadline:
            pending = {expr: title for expr, title in pending.items() if not _query(prometheus, _resolve(expr))}
            time.sleep(0.5)
        assert not pending, f"no data for: {sorted(pending.values())}"
        evaluated = _rule_health(prometheus)
        while "unknown" in {health for health, _ in evaluated.values()} and time.monotonic() < deadline:
            time.sleep(0.5)  # not evaluated yet
            evaluated = _rule_health(prometheus)
    assert len(evaluated) == 13 and set(evaluated.values()) == {("ok", "")}, evaluated


def _rule_health(prometheus: str) -> dict[str, tuple[str, str]]:
    groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
    return {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
