"""check(texts) -> verdicts: tokenise -> the two-pass steps of guard.core.runner, through the batcher.

The steps (windows -> eligible rows -> perturb -> score -> finite check -> merge) are
guard.core.runner's, the same the offline checker drives; this module admits the work
and feeds each pass to the micro-batcher. Detectors: RAP (pass 2), the feature detector
and its token blocklist (from pass 1's outputs, no extra pass); ("none",) is bare mode:
pass 1 only, the prediction answered, nothing checked or flagged (a pass-through baseline;
the server warns at start and reports it in guard_detectors). Schedules (runner): lazy
runs pass 2 only for rows predicted as a protected label, fused runs both passes at once.

Work is admitted before it is done, against the request's deadline: tokenisation
(`Tokenizing`: one thread, costed in characters) and then the backend passes (the
batcher, costed in padded tokens). What cannot finish in time is refused (429), so a
timeout is never the client's doing, and it is never let through (see GuardFailure).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from guard.admission import ADMISSION_HEADROOM, MeasuredRate
from guard.batcher import Batcher, BatcherClosedError, QueueFullError
from guard.core.errors import InputError
from guard.core.runner import GuardFailure, Run, Schedule, TwoPass
from guard.core.tokenizer import ClassifierWindow, RapTokenizer, Reading, Windows
from guard.core.types import Verdict

__all__ = ["BARE", "CheckResult", "GuardFailure", "GuardPipeline", "Schedule", "Tokenizing"]
BARE = ("none",)
T = TypeVar("T")


@dataclass(order=True)
class _Job:
    chars: int  # the cost: the queue runs the cheapest job first
    order: int  # then the oldest
    work: Callable[[], object] = field(compare=False)
    deadline: float = field(compare=False)
    result: asyncio.Future = field(compare=False, repr=False)


class Tokenizing:
    """Tokenisation in one dedicated thread, admitted like the backend's work.

    Each job is costed in characters (a round of `Reading`: exact) and the
    cheapest waiting job runs next, so a short request never waits behind queued megabytes,
    only behind the job in the thread. A job that could not finish by its deadline behind
    the running job and the cheaper waiting ones is refused at once (QueueFullError, 429);
    one still waiting at its deadline (overtaken by cheaper ones) is refused then, undone.
    Long texts never stall the event loop, nor crowd other requests out of a thread pool.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-tokenize")
        self.seconds_per_char = MeasuredRate()  # `calibrate` sets its floor at start
        self._waiting: list[_Job] = []  # a heap
        self._running: _Job | None = None
        self._order = itertools.count()

    def admit(self, chars: int, deadline: float) -> None:
        ahead = sum(j.chars for j in self._waiting if j.chars <= chars and not j.result.done())
        if self._running is not None:
            ahead += self._running.chars
        wait = (ahead + chars) * self.seconds_per_char.seconds
        budget = deadline - time.perf_counter()
        if budget <= 0 or wait > ADMISSION_HEADROOM * budget:
            raise QueueFullError(
                f"the guard's tokeniser is at capacity: this request would be read in about {wait:.2f} s, "
                f"too close to its {budget:.2f} s deadline",
                max(1.0, math.ceil(wait)),
            )

    async def run(self, work: Callable[[], T], chars: int, deadline: float) -> T:
        """`work()` in the tokeniser thread, once admitted for `chars` characters."""
        self.admit(chars, deadline)
        job = _Job(chars, next(self._order), work, deadline, asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiting, job)
        self._dispatch()
        result, seconds = await job.result
        self.seconds_per_char.observe(seconds, chars)
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _dispatch(self) -> None:
        while self._running is None and self._waiting:
            job = heapq.heappop(self._waiting)
            if job.result.done():  # its caller left
                continue
            if time.perf_counter() >= job.deadline:
                job.result.set_exception(QueueFullError("the guard's tokeniser is at capacity", 1.0))
                continue
            self._start(job)

    def _start(self, job: _Job) -> None:
        self._running = job
        loop = asyncio.get_running_loop()
        done = self._executor.submit(_timed, job.work)
        done.add_done_callback(lambda future: loop.call_soon_threadsafe(self._finished, job, future))

    def _finished(self, job: _Job, done: Future) -> None:
        self._running = None
        if not job.result.done():
            error = done.exception()
            if error is None:
                job.result.set_result(done.result())
            else:
                job.result.set_exception(error)
        self._dispatch()


def _round(reading: Reading) -> Windows | None:
    """One round of tokenising; the windows after the last."""
    return reading.windows() if reading.read_round() else None


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    return work(), time.perf_counter() - started


@dataclass(frozen=True)
class CheckResult:
    verdicts: list[Verdict]
    queue_seconds: float
    compute_seconds: float


class GuardPipeline:
    def __init__(
        self,
        tokenizer: RapTokenizer,
        batcher: Batcher,
        two_pass: TwoPass,
        timeout_s: float = 10.0,
        classifier_max_length: ClassifierWindow = None,
        tracer=None,
        detectors: Sequence[str] = ("rap",),
    ) -> None:
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.two_pass = two_pass
        self.timeout_s = timeout_s
        self.classifier_max_length = classifier_max_length
        self.tracer = tracer  # an OpenTelemetry tracer when tracing is on (guard.tracing)
        self.detectors = tuple(detectors)
        self.tokenizing = Tokenizing()

    @property
    def bare(self) -> bool:
        """No detector: one pass, the prediction only."""
        return self.detectors == BARE

    def deadline(self) -> float:
        """The perf_counter time by which a check starting now must be done."""
        return time.perf_counter() + self.timeout_s

    def close(self) -> None:
        self.tokenizing.close()

    async def windows(self, texts: Sequence[str], deadline: float | None = None) -> Windows:
        """Tokenise in the tokeniser thread, each round of prefixes admitted for its characters
        (QueueFullError if it cannot be done in time)."""
        deadline = self.deadline() if deadline is None else deadline
        reading = self.tokenizer.reading(list(texts), self.classifier_max_length)
        windows = None
        while windows is None:
            windows = await self.tokenizing.run(functools.partial(_round, reading), reading.round_chars, deadline)
        return windows

    async def check(
        self, texts: Sequence[str], windows: Windows | None = None, deadline: float | None = None
    ) -> CheckResult:
        """Verdicts for `texts`; raises GuardFailure on backend error, non-finite output or deadline.

        `deadline` (perf_counter time; default: `timeout_s` from now) bounds the whole
        check, tokenisation (when `windows` is not given) included. InputError (the text
        cannot be read), QueueFullError (no capacity before the deadline) and
        BatcherClosedError are the caller's to answer, never guard failures.
        """
        deadline = self.deadline() if deadline is None else deadline
        windows = windows or await self.windows(texts, deadline)
        run = self.two_pass.run(windows)
        try:
            with self.batcher.admitted(windows.rows, deadline, passes=self.two_pass.passes):  # both, at worst
                return await asyncio.wait_for(self._drive(run), deadline - time.perf_counter())
        except TimeoutError:
            raise GuardFailure(f"guard check exceeded {self.timeout_s:g} s", "timeout", run.first_probs) from None
        except (QueueFullError, BatcherClosedError, InputError, GuardFailure):
            raise
        except Exception as exc:  # BackendError, or anything the runtime raised
            raise GuardFailure(f"backend failed: {exc}", "backend", run.first_probs) from exc

    async def _drive(self, run: Run) -> CheckResult:
        """The runner's steps, each step's passes submitted together (fused: one round trip)."""
        steps, outputs, queue_s, compute_s = run.steps(), None, 0.0, 0.0
        while True:
            try:
                passes = steps.send(outputs)
            except StopIteration as done:
                return CheckResult(self.two_pass.verdicts(done.value), queue_s, compute_s)
            name = "guard.fused" if len(passes) > 1 else f"guard.pass{passes[0].name}"
            with self._span(name, sum(len(p.rows) for p in passes)):
                results = await asyncio.gather(*(self.batcher.submit(p.rows, p.name, p.priority) for p in passes))
            outputs = [out for out, _ in results]
            queue_s += max(t.queue_seconds for _, t in results)
            compute_s += max(t.compute_seconds for _, t in results)

    def _span(self, name: str, rows: int):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes={"guard.rows": rows})
