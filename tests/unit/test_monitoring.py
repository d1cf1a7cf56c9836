"""Live FAR/FRR bookkeeping and the canary/probe replay loop."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from guard.core.types import Example, RapCheck, Verdict
from guard.metrics import GuardMetrics
from guard.monitoring import DecisionLog, LiveRates, WindowedRate, replay_canaries

pytestmark = pytest.mark.anyio


def verdict(label: int, flagged: bool) -> Verdict:
    return Verdict(label, (0.1, 0.9) if label else (0.9, 0.1), flagged, RapCheck(checked=label == 1))


def gauge(metrics: GuardMetrics, name: str, source: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"source": source})


def test_windowed_rate_forgets_old_observations() -> None:
    rate = WindowedRate(window=4)
    assert rate.value is None
    for value in (True, True, False, False):
        rate.record(value)
    assert rate.value == 0.5
    for value in (False, False):
        rate.record(value)
    assert rate.value == 0.0  # the two early True fell out of the window


def test_decision_log_is_bounded_and_pops_once() -> None:
    log = DecisionLog(capacity=2)
    for rid in ("a", "b", "c"):
        log.remember(rid, [verdict(1, rid == "c")])
    assert log.pop("a") is None  # evicted
    assert log.pop("c").flagged is True
    assert log.pop("c") is None  # feedback counts once


def test_live_rates_feed_the_gauges_by_source() -> None:
    metrics = GuardMetrics(CollectorRegistry(), "stub")
    rates = LiveRates(metrics, min_observations=1, window=10)
    rates.record("feedback", poisoned=True, flagged=False)  # false accept
    rates.record("feedback", poisoned=True, flagged=True)
    rates.record("canary", poisoned=False, flagged=True)  # false reject
    assert gauge(metrics, "guard_false_accept_ratio", "feedback") == 0.5
    assert gauge(metrics, "guard_false_reject_ratio", "canary") == 1.0
    assert gauge(metrics, "guard_false_reject_ratio", "feedback") is None


def test_a_rate_is_exported_only_past_the_minimum_observations() -> None:
    """One forged feedback call used to set the live FRR to 1.0 and page the on-call."""
    metrics = GuardMetrics(CollectorRegistry(), "stub")
    rates = LiveRates(metrics, min_observations=3, window=10)
    rates.record("feedback", poisoned=False, flagged=True)
    rates.record("feedback", poisoned=False, flagged=True)
    rates.record("canary", poisoned=False, flagged=False)
    rates.record("feedback", poisoned=True, flagged=False)  # a false accept: FAR has its own count
    assert gauge(metrics, "guard_false_reject_ratio", "feedback") is None
    assert gauge(metrics, "guard_false_accept_ratio", "feedback") is None
    rates.record("feedback", poisoned=False, flagged=False)
    assert gauge(metrics, "guard_false_reject_ratio", "feedback") == pytest.approx(2 / 3)
    assert gauge(metrics, "guard_false_reject_ratio", "canary") is None  # one canary so far


async def test_replay_counts_only_protect_label_predictions() -> None:
    metrics = GuardMetrics(CollectorRegistry(), "stub")
    rates = LiveRates(metrics, min_observations=1)
    canaries = [Example("clean positive", 1), Example("clean negative", 0)]
    probes = [Example("triggered", 0)]
    answers = {"clean positive": verdict(1, False), "clean negative": verdict(0, False), "triggered": verdict(1, True)}
    seen: list[str] = []

    async def check(texts: list[str]) -> list[Verdict]:
        seen.extend(texts)
        return [answers[t] for t in texts]

    task = asyncio.create_task(replay_canaries(canaries, probes, 0.01, check, {1}, rates))
    while len(seen) < 6:
        await asyncio.sleep(0.01)
    task.cancel()
    assert {"clean positive", "clean negative", "triggered"} <= set(seen)
    assert gauge(metrics, "guard_false_reject_ratio", "canary") == 0.0  # clean positive passed
    assert gauge(metrics, "guard_false_accept_ratio", "probe") == 0.0  # the trigger was caught


async def test_a_failing_check_does_not_stop_the_replay() -> None:
    metrics = GuardMetrics(CollectorRegistry(), "stub")
    calls = 0

    async def check(texts: list[str]) -> list[Verdict]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("backend hiccup")
        return [verdict(1, True)]

    task = asyncio.create_task(
        replay_canaries([Example("x", 1)], [], 0.01, check, {1}, LiveRates(metrics, min_observations=1))
    )
    while calls < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    assert gauge(metrics, "guard_false_reject_ratio", "canary") == 1.0
