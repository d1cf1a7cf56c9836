"""Adaptive micro-batcher around `Backend.infer`. It knows nothing of RAP.

Callers submit unpadded token-id rows; a single worker coroutine drains the
queue into batches (at most `max_batch_size` rows and `max_batch_tokens` padded
tokens), runs the backend in one inference thread and resolves each row's
future with its logits. While a batch runs, new rows pile up and form the next
batch, so batches grow with load; when idle, the first row waits at most
`max_wait` for company. The queue is bounded: a submit that would overflow it
raises `QueueFullError` at once (the caller answers 429); nothing is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from guard.core.errors import GuardError
from guard.core.types import EncodedBatch


class QueueFullError(GuardError):
    """The batcher's queue is full; retry later."""


class BatcherClosedError(GuardError):
    """The batcher is shutting down and takes no new work."""


@dataclass(frozen=True)
class BatchStats:
    """Reported once per backend call (for metrics)."""

    rows: int
    padded_tokens: int
    tags: frozenset[str]
    queue_seconds: float  # longest wait of a row in this batch
    compute_seconds: float


@dataclass(frozen=True)
class Timing:
    """Worst queue wait and compute time over the rows of one submit."""

    queue_seconds: float
    compute_seconds: float


@dataclass
class _Row:
    ids: Sequence[int]
    tag: str
    enqueued: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(
        self,
        infer: Callable[[EncodedBatch], np.ndarray],
        pad: Callable[[Sequence[Sequence[int]]], EncodedBatch],
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.0,
        max_queue: int = 1024,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._infer, self._pad = infer, pad
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self._on_batch = on_batch or (lambda stats: None)
        self._queue: deque[_Row] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-infer")
        self._worker: asyncio.Task | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="guard-batcher")

    async def stop(self) -> None:
        """Finish every queued row, then stop the worker and the inference thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, rows: Sequence[Sequence[int]], tag: str = "") -> tuple[np.ndarray, Timing]:
        """Logits for `rows` (in order) and how long they queued and computed."""
        if self._closing:
            raise BatcherClosedError("the guard is shutting down")
        if len(self._queue) + len(rows) > self.max_queue:
            raise QueueFullError(f"queue full ({len(self._queue)} rows waiting, limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        entries = [_Row(r, tag, now, loop.create_future()) for r in rows]
        self._queue.extend(entries)
        self._wakeup.set()
        results = await asyncio.gather(*(e.future for e in entries))
        logits = np.stack([r[0] for r in results]) if results else np.empty((0, 0), dtype=np.float32)
        timing = Timing(max((r[1] for r in results), default=0.0), max((r[2] for r in results), default=0.0))
        return logits, timing

    async def _run(self) -> None:
        idle = True
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                idle = True
                continue
            if idle:  # under load the queue refills while a batch runs: no waiting then
                await self._fill()
            batch = self._take()
            idle = False
            if batch:
                await self._execute(batch)

    async def _fill(self) -> None:
        """When the queue holds less than a batch, give it `max_wait` to fill."""
        deadline = time.perf_counter() + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Row]:
        batch: list[_Row] = []
        longest = 0
        while self._queue and len(batch) < self.max_batch_size:
            row = self._queue[0]
            if row.future.done():  # its request timed out or was cancelled: skip the work
                self._queue.popleft()
                continue
            width = max(longest, len(row.ids))
            if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            longest = width
        return batch

    async def _execute(self, batch: list[_Row]) -> None:
        started = time.perf_counter()
        encoded = self._pad([r.ids for r in batch])
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self._infer, encoded)
        except Exception as exc:  # the backend's failure belongs to every request in the batch
            for row in batch:
                if not row.future.done():
                    row.future.set_exception(exc)
            return
        compute = time.perf_counter() - started
        queue_wait = max(started - r.enqueued for r in batch)
        for row, out in zip(batch, logits, strict=True):
            if not row.future.done():
                row.future.set_result((out, started - row.enqueued, compute))
        tokens = int(encoded.input_ids.size)
        self._on_batch(BatchStats(len(batch), tokens, frozenset(r.tag for r in batch), queue_wait, compute))
