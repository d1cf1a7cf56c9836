"""Adaptive micro-batcher around `Backend.infer`. It knows nothing of RAP.

Callers submit unpadded token-id rows; a single worker coroutine drains the
queue into batches (at most `max_batch_size` rows and `max_batch_tokens` padded
tokens), runs the backend in one inference thread and resolves each row's
future with its logits. While a batch runs, new rows pile up and form the next
batch, so batches grow with load; when idle, the first row waits at most
`max_wait` for company. Batches are length-aware: the oldest row (the queue's head) always
goes, and the queued rows nearest to its length join it while padding stays within
`max_padding_share` of the batch's tokens; the others keep their place for the next
batch (a share of 1 turns grouping off: first come, first served). The queue is bounded: a submit that would overflow it
raises `QueueFullError` at once (the caller answers 429); nothing is dropped.

Admission is deadline-aware: `admit` costs work in padded tokens (rows x longest row x
passes), the queue's pending work too (with the later passes of admitted work, see
`admitted`), and estimates when new rows would finish from
the measured seconds per padded token (the cost model: guard.admission); it refuses at once
(429, with Retry-After) what cannot finish before its deadline, instead of queueing it to time
out. The rate never drops below the one measured at start on full-width rows (`calibrate`):
cheap requests cannot make a long one look cheap. Rows submitted with `priority` (the second pass of an
admitted request) go to the front of the queue. Rows tagged READER_TAG run on the `reader`
graph (guard.core.reader), in batches of their own, in the same inference thread: the
reader's work is costed and queued like the model's.

The worker is supervised: a failing batch fails only its own rows; if the worker
itself dies it is restarted, and `healthy` is False until it runs again (or while
one batch has run longer than `stall_after_s`), which readiness reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from guard.admission import ADMISSION_HEADROOM, MeasuredRate, padded_tokens
from guard.core.errors import BackendError, GuardError
from guard.core.types import EncodedBatch

log = logging.getLogger(__name__)
# Length-aware batching looks this many batches deep into the queue for rows of similar length.
GROUPING_WINDOW_BATCHES = 4
READER_TAG = "R"  # guard.core.runner's reader pass


class QueueFullError(GuardError):
    """The batcher cannot take this work now; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosedError(GuardError):
    """The batcher is shutting down and takes no new work."""


@dataclass(frozen=True)
class BatchStats:
    """Reported once per backend call (for metrics)."""

    rows: int
    padded_tokens: int  # rows x longest row: what the backend computes on
    tags: frozenset[str]
    queue_seconds: float  # longest wait of a row in this batch
    compute_seconds: float
    real_tokens: int = 0  # the rows' own tokens; padded_tokens - real_tokens is padding


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
    cost: int = 0  # padded tokens: the longest row of its submit, which it is batched with


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
        stall_after_s: float = 30.0,
        max_padding_share: float = 1.0,
        reader: Callable[[EncodedBatch], np.ndarray] | None = None,
    ) -> None:
        self._infer, self._pad = infer, pad
        self._reader = reader  # runs the rows tagged READER_TAG (a second graph: never batched with the others)
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self.stall_after_s = stall_after_s
        self.max_padding_share = max_padding_share
        self._on_batch = on_batch or (lambda stats: None)
        self._queue: deque[_Row] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-infer")
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._restarting = False
        self._running: list[_Row] = []  # the batch in the backend now
        self._running_since: float | None = None
        self._queued_tokens = 0  # the padded tokens of the queued rows
        self._running_tokens = 0  # the padded tokens of the batch in the backend now
        self._reserved_tokens = 0  # later passes of admitted work, not queued yet
        self.seconds_per_token = MeasuredRate()  # per padded token; `calibrate` sets its floor
        self.restarts = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """The worker runs and no batch has been stuck in the backend past `stall_after_s`."""
        if self._worker is None or self._worker.done() or self._restarting:
            return False
        since = self._running_since
        return since is None or time.perf_counter() - since < self.stall_after_s

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._supervise(), name="guard-batcher")

    async def stop(self) -> None:
        """Finish every queued row, then stop the worker and the inference thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    def calibrate(self, seconds_per_token: float) -> None:
        """The backend's seconds per padded token, measured at start on full-width rows."""
        self.seconds_per_token.calibrate(seconds_per_token)

    def estimated_wait_s(self, tokens: int) -> float:
        """Seconds until `tokens` more padded tokens would be done, after the queue's (0 before a measure)."""
        pending = self._queued_tokens + self._running_tokens + self._reserved_tokens
        return (pending + tokens) * self.seconds_per_token.seconds

    def admit(self, rows: Sequence[Sequence[int]], deadline: float, passes: int = 1) -> None:
        """Refuse now (QueueFullError) work that cannot finish by `deadline` (perf_counter time).

        `rows` are queued now; `passes` passes over them are the work to finish (the
        second pass joins the queue later, at its front), costed in padded tokens.
        """
        if self._closing:
            raise BatcherClosedError("the guard is shutting down")
        tokens = padded_tokens(rows, passes)
        if len(self._queue) + len(rows) > self.max_queue:
            raise QueueFullError(
                f"queue full ({len(self._queue)} rows waiting, limit {self.max_queue})", self._retry_after(tokens)
            )
        wait = self.estimated_wait_s(tokens)
        budget = deadline - time.perf_counter()
        if budget <= 0 or wait > ADMISSION_HEADROOM * budget:
            raise QueueFullError(
                f"the guard is at capacity: this request would finish in about {wait:.2f} s, "
                f"too close to its {budget:.2f} s deadline",
                self._retry_after(tokens),
            )

    @contextlib.contextmanager
    def admitted(self, rows: Sequence[Sequence[int]], deadline: float, passes: int = 1) -> Iterator[None]:
        """`admit`, then while the work runs count its later passes as pending: they join the
        queue at its front, ahead of work admitted meanwhile (counted again once queued: at worst)."""
        self.admit(rows, deadline, passes)
        later = padded_tokens(rows, passes) - padded_tokens(rows)
        self._reserved_tokens += later
        try:
            yield
        finally:
            self._reserved_tokens -= later

    async def submit(
        self, rows: Sequence[Sequence[int]], tag: str = "", priority: bool = False
    ) -> tuple[np.ndarray, Timing]:
        """Logits for `rows` (in order) and how long they queued and computed.

        `priority` rows (the rest of already admitted work) go first and are not refused
        for a full queue: refusing them would waste the work already done.
        """
        if self._closing:
            raise BatcherClosedError("the guard is shutting down")
        cost = max((len(r) for r in rows), default=0)
        if not priority and len(self._queue) + len(rows) > self.max_queue:
            raise QueueFullError(
                f"queue full ({len(self._queue)} rows waiting, limit {self.max_queue})",
                self._retry_after(cost * len(rows)),
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        entries = [_Row(r, tag, now, loop.create_future(), cost) for r in rows]
        self._queued_tokens += cost * len(entries)
        if priority:
            self._queue.extendleft(reversed(entries))
        else:
            self._queue.extend(entries)
        self._wakeup.set()
        results = await asyncio.gather(*(e.future for e in entries))
        logits = np.stack([r[0] for r in results]) if results else np.empty((0, 0), dtype=np.float32)
        timing = Timing(max((r[1] for r in results), default=0.0), max((r[2] for r in results), default=0.0))
        return logits, timing

    def _retry_after(self, tokens: int) -> float:
        return max(1.0, math.ceil(self.estimated_wait_s(tokens)))

    def _dequeued(self, row: _Row) -> _Row:
        """`row` left the queue for good (into a batch, or skipped)."""
        self._queued_tokens -= row.cost
        return row

    async def _supervise(self) -> None:
        """Run the worker; if it dies, fail the batch it held and start it again."""
        backoff = 0.05
        while True:
            try:
                await self._run()
                return
            except Exception as exc:
                self.restarts += 1
                self._restarting = True
                log.exception("batcher worker failed (restart %d): %s", self.restarts, exc)
                self._fail(self._running, BackendError(f"the batcher failed: {exc}"))
                self._running, self._running_since, self._running_tokens = [], None, 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._restarting = False

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
                self._running, self._running_since = batch, time.perf_counter()
                self._running_tokens = len(batch) * max(len(r.ids) for r in batch)
                await self._execute(batch)
                self._running, self._running_since, self._running_tokens = [], None, 0

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
        return self._take_in_order() if self.max_padding_share >= 1 else self._take_grouped()

    def _take_in_order(self) -> list[_Row]:
        """First come, first served (no padding limit)."""
        batch: list[_Row] = []
        longest = 0
        while self._queue and len(batch) < self.max_batch_size:
            row = self._queue[0]
            if row.future.done():  # its request timed out or was cancelled: skip the work
                self._dequeued(self._queue.popleft())
                continue
            if batch and _graph(row) != _graph(batch[0]):  # the other graph's rows start the next batch
                break
            width = max(longest, len(row.ids))
            if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(self._dequeued(self._queue.popleft()))
            longest = width
        return batch

    def _take_grouped(self) -> list[_Row]:
        """The head row, plus the queued rows nearest its length that keep padding within bounds.

        Looks `GROUPING_WINDOW_BATCHES` batches deep; rows left out go back in their order, in
        front of the rest, so priority rows stay first and the oldest row leads the next batch.
        """
        window: list[_Row] = []
        while self._queue and len(window) < GROUPING_WINDOW_BATCHES * self.max_batch_size:
            row = self._queue.popleft()
            if not row.future.done():  # a done row's request timed out or was cancelled: skip the work
                window.append(row)
            else:
                self._dequeued(row)
        if not window:
            return []
        head, rest = window[0], window[1:]
        chosen = {0}
        longest, real = len(head.ids), len(head.ids)
        by_closeness = sorted(range(len(rest)), key=lambda i: abs(len(rest[i].ids) - len(head.ids)))
        for i in by_closeness:
            if len(chosen) >= self.max_batch_size:
                break
            if _graph(rest[i]) != _graph(head):
                continue
            n = len(rest[i].ids)
            width = max(longest, n)
            padded = width * (len(chosen) + 1)
            if padded > self.max_batch_tokens or (padded - real - n) > self.max_padding_share * padded:
                continue
            chosen.add(i + 1)
            longest, real = width, real + n
        batch = [self._dequeued(row) for i, row in enumerate(window) if i in chosen]
        self._queue.extendleft(reversed([row for i, row in enumerate(window) if i not in chosen]))
        return batch

    async def _execute(self, batch: list[_Row]) -> None:
        """One backend call. Whatever fails in it (padding, the backend, its output) fails these rows only."""
        started = time.perf_counter()
        try:
            encoded = self._pad([r.ids for r in batch])
            infer = self._infer if _graph(batch[0]) == "model" else self._reader
            if infer is None:
                raise BackendError("rows for the reader graph, but this batcher has none")
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, infer, encoded)
            logits = _checked_shape(logits, len(batch))
        except Exception as exc:  # the failure belongs to every request in the batch, and to no other
            self._fail(batch, exc)
            return
        compute = time.perf_counter() - started
        for row, out in zip(batch, logits, strict=True):
            if not row.future.done():
                row.future.set_result((out, started - row.enqueued, compute))
        self.seconds_per_token.observe(compute, int(encoded.input_ids.size))
        stats = BatchStats(
            len(batch),
            int(encoded.input_ids.size),
            frozenset(r.tag for r in batch),
            max(started - r.enqueued for r in batch),
            compute,
            sum(len(r.ids) for r in batch),
        )
        try:
            self._on_batch(stats)
        except Exception:  # metrics must never cost a request its answer
            log.exception("batch statistics callback failed")

    @staticmethod
    def _fail(rows: list[_Row], exc: BaseException) -> None:
        for row in rows:
            if not row.future.done():
                row.future.set_exception(exc)


def _graph(row: _Row) -> str:
    """Which graph runs a row: the reader's (guard.core.reader) or the model's."""
    return "reader" if row.tag == READER_TAG else "model"


def _checked_shape(logits: object, rows: int) -> np.ndarray:
    out = np.asarray(logits)
    if out.ndim != 2 or out.shape[0] != rows:
        raise BackendError(f"the backend returned logits of shape {out.shape} for {rows} rows")
    return out
