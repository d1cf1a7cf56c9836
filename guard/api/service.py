"""The guard as the HTTP layer sees it: limits, the pipeline, failure modes, bookkeeping.

Input the guard cannot read is the client's error (422/413) and never a guard failure,
so it can never be let through by failure_mode=open. Work that cannot be done before
its deadline is refused at once (429). A backend fault (backend error, non-finite
output) is 503 when closed and counted when open; a timeout is always 503 (counted):
a client could aim for one, so it is never let through unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.api.errors import GuardUnavailable, InvalidInput, PayloadTooLarge
from guard.batcher import Batcher
from guard.core.backends.base import Backend, load_backend, load_reader, precision_of
from guard.core.bundle import Bundle
from guard.core.detection import DETECTORS, Detection
from guard.core.errors import BundleError, InputError
from guard.core.runner import TwoPass
from guard.core.tokenizer import ALL_TOKENS, ClassifierWindow, RapTokenizer, Windows
from guard.core.types import RapCheck, Verdict
from guard.metrics import GuardMetrics
from guard.monitoring import DecisionLog, LiveRates, load_probe_rows, replay_canaries
from guard.pipeline import BARE, GuardFailure, GuardPipeline
from guard.settings import Settings

log = logging.getLogger(__name__)

WARMUP_TEXT = "warm-up request for the guard"
# Tokeniser rate probe: CJK text, the slowest per character of the scripts measured (about 4x English).
TOKENIZER_PROBE = "我们今天去公园玩了很久" * 2000
CHARS_PER_TOKEN = 4  # about what English WordPiece text takes: sizes the default max_request_chars


@dataclass(frozen=True)
class Outcome:
    """verdicts is None only when the check failed open before any prediction existed."""

    verdicts: list[Verdict] | None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    failed_open: str | None = None  # the failure reason when failure_mode=open let it through
    decision_id: str | None = None  # server-issued; /v1/feedback takes it

    @property
    def flagged(self) -> bool:
        return any(v.flagged for v in self.verdicts or [])


@dataclass(frozen=True)
class Capacity:
    """What this machine computes, measured once at start on full-width rows."""

    seconds_per_row: float  # one full-width row: the guard's max_length tokens
    full_request_seconds: float  # max_texts_per_request texts, both passes

    def seconds_per_token(self, max_length: int) -> float:
        """Seconds per padded token, from rows of `max_length` tokens."""
        return self.seconds_per_row / max_length

    def default_queue(self, settings: Settings) -> int:
        """Rows the backend works through within one request timeout."""
        return max(settings.max_texts_per_request, int(settings.request_timeout_s / self.seconds_per_row))

    def validate(self, settings: Settings) -> None:
        if settings.request_timeout_s <= self.full_request_seconds:
            raise InputError(
                f"request_timeout_s {settings.request_timeout_s:g} is shorter than one full request takes here "
                f"({self.full_request_seconds:.2f} s for {settings.max_texts_per_request} texts, measured at start); "
                "raise request_timeout_s or lower max_texts_per_request"
            )


def measure_capacity(backend: Backend, tokenizer: RapTokenizer, settings: Settings) -> Capacity:
    """Time one batch of full-width rows (after one untimed run) on the backend itself."""
    rows = min(settings.max_batch_size, 2 * settings.max_texts_per_request)
    row = tokenizer.ids([" ".join([WARMUP_TEXT] * tokenizer.max_length)])[0]
    batch = tokenizer.pad([row] * rows)
    backend.infer(batch)
    started = time.perf_counter()
    backend.infer(batch)
    per_token = (time.perf_counter() - started) / batch.input_ids.size
    per_row = max(per_token * tokenizer.max_length, 1e-6)
    return Capacity(per_row, per_row * 2 * settings.max_texts_per_request)


def measure_tokenizer(tokenizer: RapTokenizer) -> float:
    """Seconds per character the tokeniser takes (the slowest of a CJK and an English probe, each read
    whole, after one untimed run). A vocabulary with no token for a probe's script (a classifier
    trained without CJK, no unknown token) reads it as empty: that probe is skipped."""
    rates = []
    for probe in (TOKENIZER_PROBE, " ".join([WARMUP_TEXT] * 2000)):
        try:
            tokenizer.windows([probe], ALL_TOKENS)
        except InputError:
            continue
        started = time.perf_counter()
        tokenizer.windows([probe], ALL_TOKENS)  # one round: every character once
        rates.append((time.perf_counter() - started) / len(probe))
    return max([*rates, 1e-9])


def serving_backend(settings: Settings, bundle_dir: Path) -> Backend:
    """The backend the settings ask for: graph (optimised when the bundle has it), threads, spinning."""
    return load_backend(
        settings.backend, bundle_dir, settings.threads, optimized=settings.optimized_graphs, spinning=settings.spinning
    )


def chosen_detectors(settings: Settings, bundle: Bundle) -> tuple[str, ...]:
    """The setting's detectors, in a fixed order; by default every detector the bundle has.
    ("none",): bare mode, nothing checked. Asking for one the bundle lacks is a BundleError."""
    if settings.detectors is None:
        return tuple(bundle.detectors)
    if settings.detectors == ["none"]:
        return ("none",)
    chosen = tuple(d for d in DETECTORS if d in settings.detectors)
    missing = [d for d in chosen if d not in bundle.detectors]
    if missing:
        raise BundleError(
            f"{bundle.path} has no {missing[0]} detector (it has {', '.join(bundle.detectors)}); "
            "rebuild it with `calibrate rap` or choose another --detectors"
        )
    return chosen


def classifier_window(settings: Settings, bundle: Bundle) -> ClassifierWindow:
    """What the guard must read of each text: the configured window; as a sidecar without one, every token
    (the upstream's window is unknown: a Hugging Face pipeline reads 512); standalone the bundle's record,
    else the guard's own window (it is the classifier)."""
    if settings.classifier_max_length is not None:
        return settings.classifier_max_length
    return ALL_TOKENS if settings.upstream else bundle.manifest.model.classifier_max_length


def special_tokens_mode(settings: Settings) -> str:
    """Standalone the guard is the classifier and reads '[SEP]' as text; a sidecar reads text as HF does."""
    return settings.special_tokens or ("special" if settings.upstream else "text")


class GuardService:
    def __init__(
        self,
        settings: Settings,
        bundle: Bundle,
        backend: Backend,
        metrics: GuardMetrics,
        capacity: Capacity | None = None,
        tracer=None,
    ) -> None:
        self.settings, self.bundle, self.backend, self.metrics = settings, bundle, backend, metrics
        self.labels = bundle.manifest.model.labels
        self.tokenizer = bundle.tokenizer(special_tokens_mode(settings))  # parsing takes ~0.1 s: once
        self.capacity = capacity
        self.detectors = chosen_detectors(settings, bundle)
        chosen = Detection.of(bundle, () if self.detectors == BARE else self.detectors, precision_of(backend.name))
        two_pass = TwoPass.of(self.tokenizer, chosen, len(self.labels), settings.frr, settings.schedule)
        self.reader = None  # the reader detector's graph, when it is on (guard.core.reader)
        if two_pass.uses_reader:
            self.reader = load_reader(bundle.path, settings.threads, settings.spinning)
        self.batcher = Batcher(
            two_pass.backend_call(backend),
            self.tokenizer.pad,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue or settings.max_texts_per_request,  # set from capacity at start
            on_batch=metrics.observe_batch,
            stall_after_s=3 * settings.request_timeout_s,
            max_padding_share=settings.max_padding_share,
            reader=None if self.reader is None else self.reader.infer,
        )
        metrics.watch_batcher(lambda: self.batcher.pending, lambda: self.batcher.restarts)
        self.pipeline = GuardPipeline(
            self.tokenizer,
            self.batcher,
            two_pass,
            settings.request_timeout_s,
            classifier_window(settings, bundle),
            tracer,
            detectors=self.detectors,
        )
        self.decisions = DecisionLog()
        self.rates = LiveRates(metrics, settings.live_rates_min_observations)
        self._started = False
        self._canaries: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """Started, not stopping, and the batcher's worker is running (not restarting, not stuck)."""
        return self._started and self.batcher.healthy

    async def start(self) -> None:
        capacity = self.capacity or await asyncio.to_thread(
            measure_capacity, self.backend, self.tokenizer, self.settings
        )
        capacity.validate(self.settings)
        self.capacity = capacity
        self.batcher.max_queue = self.settings.max_queue or capacity.default_queue(self.settings)
        self.batcher.start()
        self.pipeline.tokenizing.seconds_per_char.calibrate(await asyncio.to_thread(measure_tokenizer, self.tokenizer))
        await self.pipeline.check([WARMUP_TEXT])  # first run allocates; keep it off the first user's clock
        self.batcher.calibrate(capacity.seconds_per_token(self.tokenizer.max_length))  # the warm-up is no measure
        self._publish_static_metrics()
        if self.pipeline.bare:
            log.warning(
                "BARE MODE (detectors=none): inputs are classified but NOT checked for backdoor triggers; "
                "nothing is flagged. Use it as a baseline only."
            )
        if self.settings.canary_interval_s > 0 and not self.pipeline.bare:  # no check: no live FRR to measure
            self._canaries = asyncio.create_task(self._replay())
        self._started = True

    async def stop(self) -> None:
        self._started = False
        if self._canaries is not None:
            self._canaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._canaries
        await self.batcher.stop()
        self.pipeline.close()
        self.backend.close()
        if self.reader is not None:
            self.reader.close()

    def validate(self, texts: list[str]) -> None:
        if not texts:
            raise InvalidInput("no texts to check")
        if len(texts) > self.settings.max_texts_per_request:
            raise PayloadTooLarge(
                f"{len(texts)} texts in one request; the limit is {self.settings.max_texts_per_request}"
            )
        for i, text in enumerate(texts):  # strings: the schemas and the sidecar's reader make sure
            if len(text) > self.settings.max_text_chars:
                raise PayloadTooLarge(
                    f"text {i} has {len(text)} characters; the limit is {self.settings.max_text_chars}"
                )
        chars, limit = sum(len(text) for text in texts), self.max_request_chars
        if chars > limit:
            raise PayloadTooLarge(f"this request has {chars} characters in all; the limit is {limit}")

    @property
    def max_request_chars(self) -> int:
        """The setting, or the text the queue can hold in windows: max_queue rows of half a window of new
        tokens each, at CHARS_PER_TOKEN; at least one text of max_text_chars. It bounds the tokeniser's
        work; the rows the tokens need are checked against the queue after (413)."""
        if self.settings.max_request_chars is not None:
            return self.settings.max_request_chars
        stride = max(self.tokenizer.text_window // 2, 1)  # new tokens per window past a text's first
        return max(self.settings.max_text_chars, self.batcher.max_queue * stride * CHARS_PER_TOKEN)

    async def windows(self, texts: list[str], deadline: float) -> Windows:
        """Limits, then the tokens: unreadable text is 422, text past the window 413 (long_text=refuse),
        tokenising that cannot be done before `deadline` 429."""
        self.validate(texts)
        try:
            windows = await self.pipeline.windows(texts, deadline)
        except InputError as exc:
            raise InvalidInput(str(exc)) from None
        if self.settings.long_text == "refuse" and len(windows.rows) > len(texts):
            raise PayloadTooLarge(
                f"a text is longer than the {self.tokenizer.text_window} tokens the guard reads (long_text=refuse)"
            )
        if len(windows.rows) > self.batcher.max_queue:
            raise PayloadTooLarge(
                f"this request needs {len(windows.rows)} model rows; the queue holds {self.batcher.max_queue}"
            )
        return windows

    async def check(self, texts: list[str], request_id: str, need_prediction: bool = True) -> Outcome:
        """Run the guard; apply failure_mode; record decisions, deltas and the decision log.

        `need_prediction`: the caller answers with the classifier's output (standalone
        endpoints), so failing open is impossible when pass 1 itself failed. The sidecar
        only needs a decision and can let the request through.
        """
        deadline = self.pipeline.deadline()  # tokenising and both passes, all within request_timeout_s
        windows = await self.windows(texts, deadline)
        try:
            result = await self.pipeline.check(texts, windows, deadline)
        except GuardFailure as failure:
            return self._failed(failure, need_prediction)
        outcome = Outcome(result.verdicts, result.queue_seconds, result.compute_seconds, decision_id=uuid.uuid4().hex)
        self._record(outcome, request_id)
        return outcome

    def _failed(self, failure: GuardFailure, need_prediction: bool) -> Outcome:
        self.metrics.requests.labels("error", self.settings.mode).inc()
        log.warning("guard check failed (%s): %s", failure.reason, failure)
        # failure_mode=open covers backend faults only: a timeout is a failure a client could aim for
        if self.settings.failure_mode == "closed" or not failure.backend_fault:
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
                self.metrics.rap_score.labels(self.labels[v.label]).observe(v.rap.score)
            for detector in v.flagged_by:
                self.metrics.flags.labels(detector).inc()
        self.decisions.remember(outcome.decision_id, outcome.verdicts or [])
        flagged_by = sorted({d for v in outcome.verdicts or [] for d in v.flagged_by})
        if flagged_by:
            log.info("request %s: decision %s flagged by %s", request_id, outcome.decision_id, "+".join(flagged_by))
        else:
            log.debug("request %s: decision %s (%s)", request_id, outcome.decision_id, decision)

    def _publish_static_metrics(self) -> None:
        m = self.bundle.manifest
        frr = self.settings.frr or m.default_frr
        for p in m.protect:
            self.metrics.calibrated_frr.labels(p.name).set(frr)
        for attack, far in m.evaluation.items():
            self.metrics.calibrated_far.labels(attack).set(far)
        self.metrics.model_info.labels(self.settings.model_name, self.bundle.sha256[:12]).set(1)
        self.metrics.detectors.labels(",".join(self.pipeline.detectors)).set(1)

    async def _replay(self) -> None:
        canaries = load_probe_rows(self.bundle.path / "canaries.jsonl")
        probes = load_probe_rows(self.bundle.path / "probes.jsonl")

        async def check(texts: list[str]) -> list[Verdict]:
            return (await self.pipeline.check(texts)).verdicts

        protect = set(self.bundle.protect_labels)
        await replay_canaries(canaries, probes, self.settings.canary_interval_s, check, protect, self.rates)


def _unchecked(probs: np.ndarray) -> Verdict:
    return Verdict(int(np.argmax(probs)), tuple(float(x) for x in probs), False, RapCheck(checked=False))
