"""What the alert rules and the dashboard may refer to, and a real Prometheus to run them in."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from guard.metrics import GuardMetrics

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
