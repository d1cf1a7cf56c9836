"""What the alert rules and the dashboard may refer to, and a real Prometheus to run them in."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from guard.metrics import GuardMetrics
from tests.server_fixtures import free_port, stop_process, wait_http

JOB = "backdoor-guard"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
# A selector: metric name, then optional {matchers}.
_SELECTOR = re.compile(r"(?<![\w:])(guard_[a-z_]+)(?![\w:])(?:\{([^}]*)\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def guard_series() -> dict[str, set[str]]:
    """Every series name the guard exposes, with the label names it can carry.

    Read from GuardMetrics on a fresh registry, so a renamed metric or label fails the
    rules and dashboard tests. prometheus_client has no public accessor for a metric's
    label names before a child exists, hence `_labelnames`/`_name`/`_type`.
    """
    metrics = GuardMetrics(CollectorRegistry(), "onnx")
    series: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames) | TARGET_LABELS
        if metric._type == "counter":
            series[f"{metric._name}_total"] = labels
        elif metric._type == "histogram":
            series[f"{metric._name}_bucket"] = labels | {"le"}
            series[f"{metric._name}_sum"] = series[f"{metric._name}_count"] = labels
        else:
            series[metric._name] = labels
    return series


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on) for every guard_* selector in a PromQL expression."""
    return [(m.group(1), set(_MATCHER.findall(m.group(2) or ""))) for m in _SELECTOR.finditer(expr)]


def unknown_references(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Metric names and matcher labels in `expr` that the guard does not expose."""
    problems = []
    for name, labels in selectors(expr):
        if name not in known:
            problems.append(f"unknown metric {name}")
        elif labels - known[name]:
            problems.append(f"{name} has no label(s) {sorted(labels - known[name])}")
    return problems


@contextlib.contextmanager
def running_prometheus(binary: str, target: str, workdir: Path, rule_files: list[Path] = ()) -> Iterator[str]:
    """A real Prometheus scraping `target` every second as job backdoor-guard; yields its base URL."""
    port = free_port()
    rules = "".join(f"  - {path}\n" for path in rule_files)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n"
        f"      - targets: ['{target.removeprefix('http://')}']\n",
        encoding="utf-8",
    )
    with (workdir / "prometheus.log").open("w") as log:
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process(proc)
