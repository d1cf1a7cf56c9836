"""The guard as the HTTP layer sees it: limits, the pipeline, failure modes, bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from guard.api.errors import GuardUnavailable, InvalidInput, PayloadTooLarge
from guard.batcher import Batcher
from guard.core.backends.base import Backend, precision_of
from guard.core.bundle import Bundle
from guard.core.types import RapCheck, Verdict
from guard.metrics import GuardMetrics
from guard.monitoring import DecisionLog, LiveRates, load_probe_rows, replay_canaries
from guard.pipeline import GuardFailure, GuardPipeline
from guard.settings import Settings

log = logging.getLogger(__name__)

WARMUP_TEXT = "warm-up request for the guard"


@dataclass(frozen=True)
class Outcome:
    """verdicts is None only when the check failed open before any prediction existed."""

    verdicts: list[Verdict] | None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    failed_open: str | None = None  # the failure reason when failure_mode=open let it through

    @property
    def flagged(self) -> bool:
        return any(v.flagged for v in self.verdicts or [])


class GuardService:
    def __init__(self, settings: Settings, bundle: Bundle, backend: Backend, metrics: GuardMetrics) -> None:
        self.settings, self.bundle, self.backend, self.metrics = settings, bundle, backend, metrics
        self.labels = bundle.manifest.model.labels
        tokenizer = bundle.tokenizer()  # parsing tokenizer.json takes ~0.1 s: once
        self.batcher = Batcher(
            backend.infer,
            tokenizer.pad,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=metrics.observe_batch,
        )
        self.pipeline = GuardPipeline(
            tokenizer,
            self.batcher,
            bundle.thresholds(settings.frr, precision_of(settings.backend)),
            settings.schedule,
            settings.request_timeout_s,
        )
        self.decisions = DecisionLog()
        self.rates = LiveRates(metrics)
        self.ready = False
        self._canaries: asyncio.Task | None = None

    async def start(self) -> None:
        self.batcher.start()
        await self.pipeline.check([WARMUP_TEXT])  # first run allocates; keep it off the first user's clock
        self._publish_static_metrics()
        if self.settings.canary_interval_s > 0:
            self._canaries = asyncio.create_task(self._replay())
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._canaries is not None:
            self._canaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._canaries
        await self.batcher.stop()
        self.backend.close()

    def validate(self, texts: list[str]) -> None:
        if len(texts) > self.settings.max_texts_per_request:
            raise PayloadTooLarge(
                f"{len(texts)} texts in one request; the limit is {self.settings.max_texts_per_request}"
            )
        for i, text in enumerate(texts):
            if len(text) > self.settings.max_text_chars:
                raise PayloadTooLarge(
                    f"text {i} has {len(text)} characters; the limit is {self.settings.max_text_chars}"
                )
            if not text.strip():
                raise InvalidInput(f"text {i} is empty")

    async def check(self, texts: list[str], request_id: str, need_prediction: bool = True) -> Outcome:
        """Run the guard; apply failure_mode; record decisions, deltas and the decision log.

        `need_prediction`: the caller answers with the classifier's output (standalone
        endpoints), so failing open is impossible when pass 1 itself failed. The sidecar
        only needs a decision and can let the request through.
        """
        self.validate(texts)
        self.metrics.pending.set(self.batcher.pending)
        try:
            result = await self.pipeline.check(texts)
        except GuardFailure as failure:
            return self._failed(failure, need_prediction)
        outcome = Outcome(result.verdicts, result.queue_seconds, result.compute_seconds)
        self._record(outcome, request_id)
        return outcome

    def _failed(self, failure: GuardFailure, need_prediction: bool) -> Outcome:
        self.metrics.requests.labels("error", self.settings.mode).inc()
        log.warning("guard check failed (%s): %s", failure.reason, failure)
        if self.settings.failure_mode == "closed":
            raise GuardUnavailable(f"the guard could not check this request ({failure.reason}); failing closed")
        if need_prediction and failure.probs is None:  # not let through, so not counted as allowed
            raise GuardUnavailable(f"the classifier could not run ({failure.reason}); no prediction to return")
        self.metrics.failure_mode_allowed.labels(failure.reason).inc()
        verdicts = None if failure.probs is None else [_unchecked(p) for p in failure.probs]
        return Outcome(verdicts, failed_open=failure.reason)

    def _record(self, outcome: Outcome, request_id: str) -> None:
        decision = "block" if outcome.flagged else "allow"
        self.metrics.requests.labels(decision, self.settings.mode).inc()
        for v in outcome.verdicts or []:
            if v.rap.checked:
                self.metrics.rap_delta.labels(self.labels[v.label]).observe(v.rap.delta)
        self.decisions.remember(request_id, outcome.verdicts or [])

    def _publish_static_metrics(self) -> None:
        m = self.bundle.manifest
        frr = self.settings.frr or m.default_frr
        for p in m.protect:
            self.metrics.calibrated_frr.labels(p.name).set(frr)
        for attack, far in m.evaluation.items():
            self.metrics.calibrated_far.labels(attack).set(far)
        sha = m.files.get("model.onnx", "")[:12]
        self.metrics.model_info.labels(self.settings.model_name, sha).set(1)

    async def _replay(self) -> None:
        canaries = load_probe_rows(self.bundle.path / "canaries.jsonl")
        probes = load_probe_rows(self.bundle.path / "probes.jsonl")

        async def check(texts: list[str]) -> list[Verdict]:
            return (await self.pipeline.check(texts)).verdicts

        protect = set(self.bundle.protect_labels)
        await replay_canaries(canaries, probes, self.settings.canary_interval_s, check, protect, self.rates)


def _unchecked(probs: np.ndarray) -> Verdict:
    return Verdict(int(np.argmax(probs)), tuple(float(x) for x in probs), False, RapCheck(checked=False))
