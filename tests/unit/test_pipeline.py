"""GuardPipeline over a real batcher and the stub backend: schedules, verdicts, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from guard.batcher import Batcher, QueueFullError
from guard.core.errors import InputError
from guard.core.runner import TwoPass
from guard.core.tokenizer import RapTokenizer
from guard.core.types import LabelThresholds
from guard.pipeline import GuardFailure, GuardPipeline, Tokenizing
from tests.server_fixtures import CLEAN, CLEAN_SCORE, NEGATIVE, P_CONFIDENT, RAP_ID, TRIGGERED, StubBackend

pytestmark = pytest.mark.anyio

TEXTS = [CLEAN, NEGATIVE, TRIGGERED, "bad mb movie"]
THRESHOLDS = {1: LabelThresholds(-0.1)}  # the stub statistic: prob (p1(x+RAP) - p1(x))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, RAP_ID, 32)


@pytest.fixture()
def stub() -> StubBackend:
    return StubBackend()


def _pipeline(tokenizer: RapTokenizer, stub: StubBackend, schedule: str, **kwargs) -> GuardPipeline:
    batcher = Batcher(stub.infer, tokenizer.pad, max_wait_s=0.001, **kwargs.pop("batcher", {}))
    two_pass = TwoPass(tokenizer, kwargs.pop("thresholds", THRESHOLDS), "prob", schedule=schedule)
    return GuardPipeline(tokenizer, batcher, two_pass, **kwargs)


@pytest.fixture()
async def running(tokenizer: RapTokenizer, stub: StubBackend) -> AsyncIterator:
    """Factory: pipelines it makes are started now and stopped after the test."""
    made: list[GuardPipeline] = []

    def make(schedule: str = "lazy", **kwargs) -> GuardPipeline:
        pipeline = _pipeline(tokenizer, stub, schedule, **kwargs)
        pipeline.batcher.start()
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        await pipeline.batcher.stop()


async def test_lazy_runs_pass2_only_for_protect_label_predictions(running, stub: StubBackend) -> None:
    result = await running("lazy").check(TEXTS)
    assert (stub.pass1_rows, stub.pass2_rows) == (4, 2)
    assert len(stub.calls) == 2  # pass 1, then pass 2 for the two positives
    assert [v.label for v in result.verdicts] == [1, 0, 1, 0]
    assert [v.flagged for v in result.verdicts] == [False, False, True, False]
    assert [v.rap.checked for v in result.verdicts] == [True, False, True, False]
    assert result.verdicts[0].rap.score == pytest.approx(CLEAN_SCORE)
    assert result.verdicts[2].rap.score == pytest.approx(0.0)
    assert result.verdicts[0].probs == pytest.approx((1 - P_CONFIDENT, P_CONFIDENT))
    assert result.compute_seconds > 0


async def test_lazy_skips_pass2_when_nothing_is_protected(running, stub: StubBackend) -> None:
    result = await running("lazy").check([NEGATIVE, "bad mb movie"])
    assert (stub.pass1_rows, stub.pass2_rows, len(stub.calls)) == (2, 0, 1)
    assert not any(v.rap.checked for v in result.verdicts)


async def test_fused_runs_both_passes_for_every_text_in_one_call(running, stub: StubBackend) -> None:
    await running("fused").check(TEXTS)
    assert (stub.pass1_rows, stub.pass2_rows) == (4, 4)
    assert len(stub.calls) == 1


async def test_schedules_give_identical_verdicts(running) -> None:
    lazy = await running("lazy").check(TEXTS)
    fused = await running("fused").check(TEXTS)
    assert lazy.verdicts == fused.verdicts


async def test_timeout_is_a_guard_failure(running, stub: StubBackend) -> None:
    stub.delay_s = 0.3
    with pytest.raises(GuardFailure) as caught:
        await running("lazy", timeout_s=0.05).check([CLEAN])
    assert caught.value.reason == "timeout" and caught.value.probs is None
    assert not caught.value.backend_fault  # never let through by failure_mode=open


async def test_timeout_in_pass2_keeps_the_pass1_probabilities(running, stub: StubBackend) -> None:
    stub.delay_pass2_s = 0.3
    with pytest.raises(GuardFailure) as caught:
        await running("lazy", timeout_s=0.1).check([CLEAN, NEGATIVE])
    assert caught.value.reason == "timeout"
    assert np.argmax(caught.value.probs, axis=1).tolist() == [1, 0]


async def test_backend_error_is_a_guard_failure(running, stub: StubBackend) -> None:
    stub.fail = RuntimeError("onnxruntime exploded")
    with pytest.raises(GuardFailure) as caught:
        await running("lazy").check([CLEAN])
    assert caught.value.reason == "backend" and caught.value.probs is None and caught.value.backend_fault
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize(("schedule", "has_probs"), [("lazy", True), ("fused", False)])
async def test_pass2_error_carries_pass1_probs_when_pass1_finished(
    running, stub: StubBackend, schedule: str, has_probs: bool
) -> None:
    """Lazy finishes pass 1 before pass 2 fails; fused runs both in the failing batch."""
    stub.fail_pass2 = RuntimeError("pass 2 broke")
    with pytest.raises(GuardFailure) as caught:
        await running(schedule).check([CLEAN, NEGATIVE])
    assert caught.value.reason == "backend"
    if has_probs:
        assert caught.value.probs.shape == (2, 2)
        assert caught.value.probs[0, 1] == pytest.approx(P_CONFIDENT)
    else:
        assert caught.value.probs is None


async def test_queue_full_and_bad_input_are_not_guard_failures(running) -> None:
    with pytest.raises(QueueFullError):
        await running("fused", batcher={"max_queue": 3}).check([CLEAN, NEGATIVE])  # 4 rows > 3
    with pytest.raises(InputError):
        await running("lazy").check([CLEAN, 3])  # type: ignore[list-item]


async def test_bare_runs_one_pass_and_checks_nothing(running, stub: StubBackend) -> None:
    pipeline = running("lazy", detectors=("none",), thresholds={})
    assert pipeline.bare
    result = await pipeline.check(TEXTS)
    assert (stub.pass1_rows, stub.pass2_rows) == (4, 0)  # no second pass, not even for the trigger
    assert [v.label for v in result.verdicts] == [1, 0, 1, 0]  # the prediction is answered
    assert not any(v.flagged or v.rap.checked for v in result.verdicts)


async def test_bare_ignores_the_schedule(running, stub: StubBackend) -> None:
    result = await running("fused", detectors=("none",), thresholds={}).check([TRIGGERED])
    assert (stub.pass1_rows, stub.pass2_rows) == (1, 0)
    assert not result.verdicts[0].flagged


@pytest.mark.parametrize("schedule", ["lazy", "fused"])
async def test_a_suspicious_token_in_a_later_window_is_flagged(tokenizer: RapTokenizer, stub: StubBackend, schedule):
    """The outlier-token scan reads every window the classifier reads: a trigger past the guard's own
    window (a sidecar before a longer classifier) is flagged, on either schedule, with RAP off."""
    from types import SimpleNamespace

    from guard.core import features

    rng = np.random.default_rng(0)
    x, predicted = rng.normal(size=(40, 2, 4)), np.ones(40, int)
    trigger = tokenizer.token_id("cf")
    stats = features.with_suspicious_tokens(
        features.standardise(features.fit(x, predicted, [1]), x, predicted), np.array([trigger])
    )
    backend = SimpleNamespace(infer_with_features=lambda b: (stub.infer(b), np.zeros((len(b), 2, 4), np.float32)))
    two_pass = TwoPass(tokenizer, {1: LabelThresholds(None, 1e9)}, "prob", stats, 2, schedule)
    batcher = Batcher(two_pass.backend_call(backend), tokenizer.pad, max_wait_s=0.001)
    pipeline = GuardPipeline(tokenizer, batcher, two_pass, classifier_max_length=128)
    batcher.start()
    try:
        long_clean = " ".join([CLEAN] * 12)
        result = await pipeline.check([long_clean, f"{long_clean} cf"])
    finally:
        await batcher.stop()
    assert [v.flagged_by for v in result.verdicts] == [(), ("token",)]
    assert stub.pass2_rows == 0  # the feature detector alone runs no pass 2


# ---------------------------------------------------------------- tokenising, admitted (issue 28)


async def test_tokenising_that_cannot_be_done_in_time_is_refused_before_it_starts(running, stub: StubBackend) -> None:
    pipeline = running("lazy")
    pipeline.tokenizing.seconds_per_char.calibrate(1e-2)
    long = "good " * 2000  # its first round reads 1,256 characters: ~12.6 s at 10 ms a character
    with pytest.raises(QueueFullError, match="tokeniser"):
        await pipeline.check([long])
    assert pipeline.tokenizing._running is None and not stub.calls
    assert (await pipeline.check([CLEAN])).verdicts[0].label == 1  # 10 characters: 10 ms


async def _blocked(tokenizing: Tokenizing) -> tuple[threading.Event, asyncio.Task]:
    """Hold the tokeniser thread until the event is set."""
    gate = threading.Event()
    held = asyncio.create_task(tokenizing.run(lambda: gate.wait(5), 1, time.perf_counter() + 10))
    while tokenizing._running is None:
        await asyncio.sleep(0.001)
    return gate, held


async def test_the_cheapest_waiting_tokenising_runs_next() -> None:
    """Six queued megabyte requests made a one-text request wait 11.7 s: now it waits for the running one only."""
    tokenizing, ran = Tokenizing(), []
    gate, held = await _blocked(tokenizing)
    deadline = time.perf_counter() + 10
    big = [asyncio.create_task(tokenizing.run(lambda i=i: ran.append(f"big{i}"), 1_000_000, deadline)) for i in (1, 2)]
    small = asyncio.create_task(tokenizing.run(lambda: ran.append("small"), 10, deadline))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(held, small, *big)
    assert ran == ["small", "big1", "big2"]
    tokenizing.close()


async def test_tokenising_admission_counts_the_running_and_cheaper_waiting_work() -> None:
    tokenizing = Tokenizing()
    tokenizing.seconds_per_char.calibrate(1e-3)
    gate, held = await _blocked(tokenizing)
    waiting = asyncio.create_task(tokenizing.run(lambda: None, 3_000, time.perf_counter() + 10))
    await asyncio.sleep(0.01)
    tokenizing.admit(1_000, time.perf_counter() + 3)  # 1 + 1,000 characters: ~1 s of a 3 s budget
    with pytest.raises(QueueFullError):
        tokenizing.admit(3_000, time.perf_counter() + 10)  # 1 + 3,000 + 3,000: ~6 s of 10
    gate.set()
    await asyncio.gather(held, waiting)
    tokenizing.close()


async def test_tokenising_still_waiting_at_its_deadline_is_refused_undone() -> None:
    tokenizing, ran = Tokenizing(), []
    gate, held = await _blocked(tokenizing)
    late = asyncio.create_task(tokenizing.run(lambda: ran.append("late"), 10, time.perf_counter() + 0.05))
    await asyncio.sleep(0.1)
    gate.set()
    await held
    with pytest.raises(QueueFullError):
        await late
    assert not ran
    tokenizing.close()


async def _with_reader(tokenizer, stub, reader, **kwargs) -> GuardPipeline:
    batcher = Batcher(stub.infer, tokenizer.pad, max_wait_s=0.001, reader=reader.infer)
    limits = {1: LabelThresholds(-0.1, reader=1.0)}
    pipeline = GuardPipeline(tokenizer, batcher, TwoPass(tokenizer, limits, "prob"), **kwargs)
    batcher.start()
    return pipeline


async def test_the_reader_reads_protect_label_rows_on_its_own_graph_within_the_check(tokenizer, stub) -> None:
    reader = StubBackend()
    pipeline = await _with_reader(tokenizer, stub, reader)
    try:
        result = await pipeline.check(TEXTS)
    finally:
        await pipeline.batcher.stop()
    assert (stub.pass1_rows, stub.pass2_rows, reader.pass1_rows, reader.pass2_rows) == (4, 2, 2, 0)
    assert pipeline.two_pass.passes == 3  # admission reserves the reader's pass too
    assert [v.flagged_by for v in result.verdicts] == [(), (), ("rap",), ()]  # the stub reader agrees: 0 < 1


@pytest.mark.parametrize("fault", ["error", "stall"])
async def test_a_failing_or_stalled_reader_is_a_guard_failure_never_an_unchecked_pass(tokenizer, stub, fault) -> None:
    reader = StubBackend()
    if fault == "error":
        reader.fail = RuntimeError("reader session lost")
    else:
        reader.delay_s = 0.3
    pipeline = await _with_reader(tokenizer, stub, reader, timeout_s=0.1)
    try:
        with pytest.raises(GuardFailure) as caught:
            await pipeline.check([CLEAN])
    finally:
        await pipeline.batcher.stop()
    assert caught.value.reason == ("backend" if fault == "error" else "timeout")
    assert caught.value.backend_fault == (fault == "error")  # a timeout can never fail open


async def test_the_switch_pass_runs_on_the_models_graph_with_pass_2_within_the_check(tokenizer, stub) -> None:
    word = tokenizer.token_id("rq")
    batcher = Batcher(stub.infer, tokenizer.pad, max_wait_s=0.001)  # no reader graph: the switch rows need none
    two_pass = TwoPass(tokenizer, {1: LabelThresholds(-0.1, switch=1.0)}, "prob", switch_id=word)
    pipeline = GuardPipeline(tokenizer, batcher, two_pass)
    batcher.start()
    try:
        result = await pipeline.check(TEXTS)
    finally:
        await batcher.stop()
    switched = [r for b in stub.calls for r, m in zip(b.input_ids, b.attention_mask, strict=True) if r[1] == word]
    assert len(switched) == 2 and stub.pass2_rows == 2  # the two protect-label texts, once each
    assert pipeline.two_pass.passes == 3  # admission reserves the switch pass too
    assert [v.flagged_by for v in result.verdicts] == [(), (), ("rap",), ()]  # the stub ignores the word: no fall
