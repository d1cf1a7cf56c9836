"""Live FAR/FRR: feedback on past decisions and canary replays feed windowed rates."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Gauge

from guard.core.types import Example, Verdict
from guard.metrics import GuardMetrics

log = logging.getLogger(__name__)


class WindowedRate:
    """Share of True over the last `window` observations (None until the first)."""

    def __init__(self, window: int = 1000) -> None:
        self._values: deque[bool] = deque(maxlen=window)

    def record(self, value: bool) -> None:
        self._values.append(value)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def value(self) -> float | None:
        return sum(self._values) / len(self._values) if self._values else None


@dataclass(frozen=True)
class Decision:
    flagged: bool
    checked: bool


class DecisionLog:
    """Recent decisions by request id, so `/v1/feedback` can score them (bounded, oldest evicted)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._items: OrderedDict[str, Decision] = OrderedDict()
        self._capacity = capacity

    def remember(self, request_id: str, verdicts: list[Verdict]) -> None:
        flagged = any(v.flagged for v in verdicts)
        self._items[request_id] = Decision(flagged, any(v.rap.checked for v in verdicts))
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def pop(self, request_id: str) -> Decision | None:
        return self._items.pop(request_id, None)


class LiveRates:
    """Feeds guard_false_accept_ratio / guard_false_reject_ratio by source.

    A source's gauge appears only once its window holds `min_observations`: before that a
    handful of answers (one forged feedback call) would read as a rate and page someone.
    """

    def __init__(self, metrics: GuardMetrics, min_observations: int, window: int = 1000) -> None:
        self._metrics = metrics
        self._far: dict[str, WindowedRate] = {}
        self._frr: dict[str, WindowedRate] = {}
        self._min_observations = min_observations
        self._window = window

    def record(self, source: str, poisoned: bool, flagged: bool) -> None:
        """A poisoned input let through is a false accept; a clean one flagged a false reject."""
        if poisoned:
            self._update(self._far, self._metrics.false_accept_ratio, source, not flagged)
        else:
            self._update(self._frr, self._metrics.false_reject_ratio, source, flagged)

    def _update(self, rates: dict[str, WindowedRate], gauge: Gauge, source: str, wrong: bool) -> None:
        rate = rates.setdefault(source, WindowedRate(self._window))
        rate.record(wrong)
        if len(rate) >= self._min_observations:
            gauge.labels(source).set(rate.value)


def load_probe_rows(path: Path) -> list[Example]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            rows.append(Example(record["text"], int(record.get("label", -1))))
    return rows


async def replay_canaries(
    canaries: list[Example],
    probes: list[Example],
    interval_s: float,
    check: Callable[[list[str]], Awaitable[list[Verdict]]],
    protect_labels: set[int],
    rates: LiveRates,
) -> None:
    """Every `interval_s`, check one clean canary (and one known-trigger probe if any).

    Only canaries predicted as a protected label say something about FRR; probes
    predicted as a protected label say something about FAR.
    """
    clean, triggered = itertools.cycle(canaries or [None]), itertools.cycle(probes or [None])
    while True:
        await asyncio.sleep(interval_s)
        for row, poisoned in ((next(clean), False), (next(triggered), True)):
            if row is None:
                continue
            try:
                (verdict,) = await check([row.text])
            except Exception as exc:  # a canary must never take the server down
                log.warning("canary check failed: %s", exc)
                continue
            if verdict.label in protect_labels:
                rates.record("probe" if poisoned else "canary", poisoned, verdict.flagged)
