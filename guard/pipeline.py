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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from guard.batcher import Batcher, BatcherClosedError, QueueFullError, Timing
from guard.core import features, rap
from guard.core.errors import GuardError, InputError
from guard.core.tokenizer import RapTokenizer, Windows
from guard.core.types import LabelThresholds, Verdict

Schedule = Literal["fused", "lazy"]
BARE = ("none",)


class GuardFailure(GuardError):
    """The guard could not finish its check (backend error, non-finite output, timeout).

    `probs` holds pass-1 probabilities when pass 1 finished: failure_mode=open
    can then still answer with an (unchecked) prediction.
    """

    def __init__(self, message: str, reason: str, probs: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.probs = probs


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
        classifier_max_length: int | None = None,
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

    @property
    def bare(self) -> bool:
        """No detector: one pass, the prediction only."""
        return self.detectors == BARE

    async def windows(self, texts: Sequence[str]) -> Windows:
        """Tokenise in a worker thread: a long text must not stall the event loop."""
        return await asyncio.to_thread(self.tokenizer.windows, list(texts), self.classifier_max_length)

    async def check(self, texts: Sequence[str], windows: Windows | None = None) -> CheckResult:
        """Verdicts for `texts`; raises GuardFailure on backend error, non-finite output or deadline.

        InputError (the text cannot be read), QueueFullError (no capacity before the
        deadline) and BatcherClosedError are the caller's to answer, never guard failures.
        """
        deadline = time.perf_counter() + self.timeout_s
        state: dict[str, np.ndarray] = {}
        fused = self.schedule == "fused" and self.uses_rap  # the feature detector alone needs no pass 2
        run = self._bare if self.bare else self._fused if fused else self._lazy
        try:
            return await asyncio.wait_for(self._run(run, texts, windows, deadline, state), self.timeout_s)
        except TimeoutError:
            raise GuardFailure(f"guard check exceeded {self.timeout_s:g} s", "timeout", state.get("probs")) from None
        except (QueueFullError, BatcherClosedError, InputError, GuardFailure):
            raise
        except Exception as exc:  # BackendError, or anything the runtime raised
            raise GuardFailure(f"backend failed: {exc}", "backend", state.get("probs")) from exc

    async def _run(self, run, texts, windows: Windows | None, deadline: float, state: dict) -> CheckResult:
        windows = windows or await self.windows(texts)
        self.batcher.admit(len(windows.rows), deadline, passes=1 if self.bare else 2)  # both passes, at worst
        return await run(windows, state)

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
