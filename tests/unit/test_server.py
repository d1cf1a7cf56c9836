"""The bound on open connections: who is closed when it is reached, and that it is counted."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from guard.metrics import GuardMetrics
from guard.server import OpenConnections


class Connection:
    """What OpenConnections needs of a connection: is it awaiting a request head, and close()."""

    def __init__(self, awaiting_head: bool = True) -> None:
        self.awaiting = awaiting_head
        self.closed = False

    def awaiting_head(self) -> bool:
        return self.awaiting

    def close(self) -> None:
        self.closed = True


def _table(limit: int) -> tuple[OpenConnections, GuardMetrics]:
    metrics = GuardMetrics(CollectorRegistry(), "stub")
    return OpenConnections(limit, metrics.connections_dropped), metrics


def _dropped(metrics: GuardMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("guard_connections_dropped_total", {"reason": reason})


def test_past_the_bound_the_oldest_connection_awaiting_a_head_is_shed() -> None:
    table, metrics = _table(limit=3)
    serving, oldest_idle, idle = Connection(awaiting_head=False), Connection(), Connection()
    for conn in (serving, oldest_idle, idle):
        table.admit(conn)
    assert not any(c.closed for c in (serving, oldest_idle, idle))  # within the bound
    probe = Connection()
    table.admit(probe)
    assert oldest_idle.closed and not (serving.closed or idle.closed or probe.closed)
    assert _dropped(metrics, "shed") == 1
    table.admit(Connection())
    assert idle.closed and not probe.closed  # a shed connection is not picked twice
    assert _dropped(metrics, "shed") == 2


def test_the_newcomer_is_refused_only_when_every_other_connection_carries_a_request() -> None:
    table, metrics = _table(limit=2)
    first, second = Connection(awaiting_head=False), Connection(awaiting_head=False)
    table.admit(first)
    table.admit(second)
    newcomer = Connection()
    table.admit(newcomer)
    assert newcomer.closed and not (first.closed or second.closed)
    assert _dropped(metrics, "refused") == 1 and _dropped(metrics, "shed") is None
    table.discard(first)  # its connection was lost: room for one
    later = Connection()
    table.admit(later)
    assert not later.closed
