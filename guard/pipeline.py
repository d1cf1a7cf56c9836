"""check(texts) -> verdicts: encode -> pass 1 (+ pass 2) -> rap.decide_all.

Detectors: RAP (pass 2) and the feature detector (guard.core.features), whose
input is an extra output of pass 1, so it adds no pass. With the feature detector
on, the batcher's backend call returns each row's logits and features packed in
one row (`packed_infer`); `unpack` splits them.

What runs is chosen here and nowhere else, from `detectors` (settings.detectors):
- ("rap",), ("features",), ("rap", "features"): the detectors; RAP's pass 2 on one of
  two schedules (below), the feature detector from pass 1's outputs;
- ("none",): bare: pass 1 only, the prediction answered, nothing checked or flagged
  (a pass-through baseline; the server warns at start and reports it in guard_detectors).

Two schedules:
- lazy: pass 1 for every text, then pass 2 only for texts predicted as a
  protected label. Compute = (1 + share of protect-label traffic) x bare.
- fused: pass 1 and pass 2 for every text submitted together, so both land in
  the same backend batch. One round trip (lowest latency), 2 x bare compute.

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from guard.batcher import ADMISSION_HEADROOM, Batcher, BatcherClosedError, MeasuredRate, QueueFullError, Timing
from guard.core import features, rap
from guard.core.errors import GuardError, InputError
from guard.core.tokenizer import ClassifierWindow, RapTokenizer, Reading, Windows
from guard.core.types import LabelThresholds, Verdict

Schedule = Literal["fused", "lazy"]
BARE = ("none",)
T = TypeVar("T")
BACKEND_FAULTS = ("backend", "nonfinite")  # the failures failure_mode=open may let through


class GuardFailure(GuardError):
    """The guard could not finish its check (backend error, non-finite output, timeout).

    `probs` holds pass-1 probabilities when pass 1 finished: failure_mode=open
    can then still answer with an (unchecked) prediction, for a backend fault only.
    """

    def __init__(self, message: str, reason: str, probs: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.probs = probs

    @property
    def backend_fault(self) -> bool:
        """A backend error or non-finite output. A timeout is not: a client could aim for one
        (admitted work that ran late), so it must never become an unchecked pass."""
        return self.reason in BACKEND_FAULTS


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


def packed_infer(backend):
    """The backend call for the batcher when the feature detector is on: [logits | features] per row."""

    def infer(batch):
        logits, feats = backend.infer_with_features(batch)
        return np.concatenate([logits, feats.reshape(len(feats), -1)], axis=1)

    return infer


def unpack(outputs: np.ndarray, labels: int, stats: features.FeatureStats | None):
    """(logits, features or None) from the batcher's rows."""
    if stats is None:
        return outputs, None
    return outputs[:, :labels], outputs[:, labels:].reshape(len(outputs), stats.layers, stats.hidden)


class GuardPipeline:
    def __init__(
        self,
        tokenizer: RapTokenizer,
        batcher: Batcher,
        thresholds: Mapping[int, float | LabelThresholds],
        schedule: Schedule = "lazy",
        timeout_s: float = 10.0,
        classifier_max_length: ClassifierWindow = None,
        statistic: rap.Statistic = "prob",
        tracer=None,
        feature_stats: features.FeatureStats | None = None,
        labels: int | None = None,
        detectors: Sequence[str] = ("rap",),
    ) -> None:
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.thresholds = {
            k: v if isinstance(v, LabelThresholds) else LabelThresholds(float(v)) for k, v in thresholds.items()
        }
        self.uses_rap = any(t.rap is not None for t in self.thresholds.values())
        self.feature_stats = feature_stats if any(t.features is not None for t in self.thresholds.values()) else None
        if self.feature_stats is not None and labels is None:
            raise ValueError("the feature detector needs the number of labels to unpack the backend's rows")
        self.labels = labels
        self.schedule = schedule
        self.timeout_s = timeout_s
        self.classifier_max_length = classifier_max_length
        self.statistic = statistic
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
        state: dict[str, np.ndarray] = {}
        fused = self.schedule == "fused" and self.uses_rap  # the feature detector alone needs no pass 2
        run = self._bare if self.bare else self._fused if fused else self._lazy
        try:
            with self.batcher.admitted(windows.rows, deadline, passes=1 if self.bare else 2):  # both, at worst
                return await asyncio.wait_for(run(windows, state), deadline - time.perf_counter())
        except TimeoutError:
            raise GuardFailure(f"guard check exceeded {self.timeout_s:g} s", "timeout", state.get("probs")) from None
        except (QueueFullError, BatcherClosedError, InputError, GuardFailure):
            raise
        except Exception as exc:  # BackendError, or anything the runtime raised
            raise GuardFailure(f"backend failed: {exc}", "backend", state.get("probs")) from exc

    def _span(self, name: str, rows: int):
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes={"guard.rows": rows})

    async def _bare(self, windows: Windows, state: dict) -> CheckResult:
        with self._span("guard.pass1", len(windows.rows)):
            logits, t1 = await self.batcher.submit(windows.rows, "1")
        probs = _probs(logits, "pass 1")
        state["probs"] = probs[windows.first_rows()]
        verdicts = rap.merge_windows(rap.decide(probs, probs[:0], {}, self.statistic), windows.owner)
        return CheckResult(verdicts, t1.queue_seconds, t1.compute_seconds)

    async def _lazy(self, windows: Windows, state: dict) -> CheckResult:
        with self._span("guard.pass1", len(windows.rows)):
            outputs, t1 = await self.batcher.submit(windows.rows, "1")
        logits, feats = unpack(outputs, self.labels, self.feature_stats)
        probs = _probs(logits, "pass 1")
        state["probs"] = probs[windows.first_rows()]
        rows = rap.eligible_rows(probs, self.thresholds.keys())
        perturbed, t2 = np.empty((0, probs.shape[1])), Timing(0.0, 0.0)
        if len(rows) and self.uses_rap:
            pass2 = self.tokenizer.perturb([windows.rows[i] for i in rows])
            with self._span("guard.pass2", len(pass2)):
                outputs2, t2 = await self.batcher.submit(pass2, "2", priority=True)
            perturbed = _probs(unpack(outputs2, self.labels, self.feature_stats)[0], "pass 2", state["probs"])
        verdicts = self._decide(probs, perturbed, feats, rows, windows, state)
        return CheckResult(
            rap.merge_windows(verdicts, windows.owner),
            t1.queue_seconds + t2.queue_seconds,
            t1.compute_seconds + t2.compute_seconds,
        )

    async def _fused(self, windows: Windows, state: dict) -> CheckResult:
        with self._span("guard.fused", 2 * len(windows.rows)):
            (outputs, t1), (outputs2, t2) = await asyncio.gather(
                self.batcher.submit(windows.rows, "1"),
                self.batcher.submit(self.tokenizer.perturb(windows.rows), "2"),
            )
        logits, feats = unpack(outputs, self.labels, self.feature_stats)
        probs = _probs(logits, "pass 1")
        state["probs"] = probs[windows.first_rows()]
        perturbed = _probs(unpack(outputs2, self.labels, self.feature_stats)[0], "pass 2", state["probs"])
        rows = rap.eligible_rows(probs, self.thresholds.keys())
        verdicts = self._decide(probs, perturbed[rows], feats, rows, windows, state)
        return CheckResult(
            rap.merge_windows(verdicts, windows.owner),
            max(t1.queue_seconds, t2.queue_seconds),
            max(t1.compute_seconds, t2.compute_seconds),
        )

    def _decide(self, probs, perturbed, feats, rows, windows: Windows, state) -> list[Verdict]:
        scores = None
        if self.feature_stats is not None:
            if not np.isfinite(feats[rows]).all():
                raise GuardFailure("the model returned non-finite features in pass 1", "nonfinite", state["probs"])
            tokens = [windows.rows[i] for i in rows]
            scores = features.scores(self.feature_stats, feats[rows], probs[rows].argmax(axis=1), tokens)
        return rap.decide_all(probs, perturbed, self.thresholds, self.statistic, scores)


def _probs(logits: np.ndarray, which: str, known: np.ndarray | None = None) -> np.ndarray:
    """Softmax of finite logits; NaN or inf is a guard failure, never an answer."""
    if not np.isfinite(logits).all():
        raise GuardFailure(f"the model returned non-finite logits in {which}", "nonfinite", known)
    return rap.softmax(logits)
