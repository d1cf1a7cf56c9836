"""The micro-batcher with a recording backend: batch limits, order, merging, back-pressure, failures, shutdown.

The backend answers each row with logits [first id, row length], so every
test can tell which row a result belongs to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from guard.admission import MeasuredRate, padded_tokens
from guard.batcher import Batcher, BatcherClosedError, BatchStats, QueueFullError
from guard.core.errors import BackendError
from guard.core.types import EncodedBatch

pytestmark = pytest.mark.anyio


def pad(rows: Sequence[Sequence[int]]) -> EncodedBatch:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return EncodedBatch(ids, mask, np.zeros_like(ids))


class Recorder:
    """Backend stand-in: records each batch's rows; can block (gate) or raise."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.error: Exception | None = None

    def __call__(self, batch: EncodedBatch) -> np.ndarray:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.error is not None:
            raise self.error
        rows = [ids[mask == 1].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
        self.batches.append(rows)
        return np.array([[row[0], len(row)] for row in rows], dtype=np.float32)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


class Running:
    """`async with Running(backend, **limits) as batcher`: started, and stopped afterwards."""

    def __init__(self, backend: Recorder, **kwargs) -> None:
        self.stats: list[BatchStats] = []
        self.batcher = Batcher(backend, pad, on_batch=self.stats.append, **kwargs)

    async def __aenter__(self) -> Batcher:
        self.batcher.start()
        return self.batcher

    async def __aexit__(self, *exc) -> None:
        await self.batcher.stop()


async def test_results_keep_row_order() -> None:
    backend = Recorder()
    rows = [[i, *range(i % 5)] for i in range(1, 21)]
    async with Running(backend, max_batch_size=6) as batcher:
        logits, timing = await batcher.submit(rows)
    assert logits.tolist() == [[row[0], len(row)] for row in rows]
    assert [r for batch in backend.batches for r in batch] == rows
    assert timing.compute_seconds > 0 and timing.queue_seconds >= 0


async def test_batches_respect_max_batch_size() -> None:
    backend = Recorder()
    async with Running(backend, max_batch_size=3) as batcher:
        await batcher.submit([[i] for i in range(1, 8)])
    assert backend.sizes == [3, 3, 1]


async def test_batches_respect_max_batch_tokens() -> None:
    backend = Recorder()
    rows = [[1, 1], [2, 2], [3] * 8, [4] * 8, [5] * 20]
    async with Running(backend, max_batch_size=32, max_batch_tokens=16) as batcher:
        logits, _ = await batcher.submit(rows)
    # [1,1],[2,2] pad to 2 x 2; adding an 8-token row would pad 3 x 8 = 24 > 16. Two 8-token rows fit
    # exactly (16); a row longer than the budget still runs, alone.
    assert [[len(r) for r in b] for b in backend.batches] == [[2, 2], [8, 8], [20]]
    assert logits[:, 0].tolist() == [1, 2, 3, 4, 5]


async def test_concurrent_submits_share_one_backend_call() -> None:
    backend = Recorder()
    running = Running(backend, max_batch_size=32, max_wait_s=0.05)
    async with running as batcher:
        results = await asyncio.gather(*(batcher.submit([[i, i]], tag="1") for i in range(1, 6)))
    assert backend.sizes == [5]
    assert [logits.tolist() for logits, _ in results] == [[[i, 2]] for i in range(1, 6)]
    (stats,) = running.stats
    assert (stats.rows, stats.padded_tokens, stats.tags) == (5, 10, frozenset({"1"}))


async def test_rows_that_queue_while_a_batch_runs_form_the_next_batch() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    running = Running(backend, max_batch_size=32, max_wait_s=0)
    async with running as batcher:
        first = asyncio.create_task(batcher.submit([[1]], tag="1"))
        await wait_until(backend.entered.is_set)
        others = [asyncio.create_task(batcher.submit([[i]], tag=str(i % 2 + 1))) for i in range(2, 6)]
        await wait_until(lambda: batcher.pending == 4)
        backend.gate.set()
        await asyncio.gather(first, *others)
    assert backend.sizes == [1, 4]
    assert [s.tags for s in running.stats] == [frozenset({"1"}), frozenset({"1", "2"})]


async def test_queue_full_fails_at_once() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_queue=2, max_wait_s=0) as batcher:
        running = asyncio.create_task(batcher.submit([[1]]))
        await wait_until(backend.entered.is_set)  # row 1 left the queue for the backend
        queued = asyncio.create_task(batcher.submit([[2], [3]]))
        await wait_until(lambda: batcher.pending == 2)
        with pytest.raises(QueueFullError, match="limit 2"):
            await asyncio.wait_for(batcher.submit([[4]]), timeout=1)
        assert batcher.pending == 2  # nothing of the refused submit was queued
        backend.gate.set()
        await asyncio.gather(running, queued)
    assert backend.batches == [[[1]], [[2], [3]]]


async def test_backend_error_reaches_every_row_of_the_batch() -> None:
    backend = Recorder()
    backend.error = RuntimeError("runtime exploded")
    async with Running(backend, max_wait_s=0.05) as batcher:
        results = await asyncio.gather(*(batcher.submit([[i]]) for i in (1, 2, 3)), return_exceptions=True)
        backend.error = None
        logits, _ = await batcher.submit([[7]])  # the worker survived
    assert all(isinstance(r, RuntimeError) and str(r) == "runtime exploded" for r in results)
    assert logits.tolist() == [[7, 1]]


async def test_timed_out_and_cancelled_rows_are_skipped() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_wait_s=0) as batcher:
        running = asyncio.create_task(batcher.submit([[1]]))
        await wait_until(backend.entered.is_set)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit([[2], [2]]), timeout=0.02)
        cancelled = asyncio.create_task(batcher.submit([[3]]))
        kept = asyncio.create_task(batcher.submit([[4]]))
        await wait_until(lambda: batcher.pending == 4)
        cancelled.cancel()
        backend.gate.set()
        await running
        logits, _ = await kept
    assert backend.batches == [[[1]], [[4]]]  # rows 2 and 3 never reached the backend
    assert logits.tolist() == [[4, 1]]


async def test_stop_drains_queued_work_then_refuses_new_submits() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    batcher = Batcher(backend, pad, max_batch_size=2, max_wait_s=0)
    batcher.start()
    submits = [asyncio.create_task(batcher.submit([[i]])) for i in range(1, 6)]
    await wait_until(backend.entered.is_set)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.01)
    with pytest.raises(BatcherClosedError):
        await batcher.submit([[9]])
    assert not stopping.done()
    backend.gate.set()
    await stopping
    results = [logits.tolist() for logits, _ in await asyncio.gather(*submits)]
    assert results == [[[i, 1]] for i in range(1, 6)]
    assert [r for batch in backend.batches for r in batch] == [[i] for i in range(1, 6)]


# ---------------------------------------------------------------- supervision (issue 13)


async def test_a_wrong_shaped_answer_fails_only_its_own_batch() -> None:
    backend = Recorder()
    calls = {"n": 0}

    def short_once(batch: EncodedBatch) -> np.ndarray:
        calls["n"] += 1
        out = backend(batch)
        return out[:-1] if calls["n"] == 1 else out

    async with Running(backend) as batcher:
        batcher._infer = short_once
        with pytest.raises(Exception, match="shape"):
            await batcher.submit([[1], [2]])
        logits, _ = await batcher.submit([[3], [4]])
        assert logits[:, 0].tolist() == [3, 4]
        assert batcher.healthy


async def test_a_failing_statistics_callback_costs_no_answer() -> None:
    backend = Recorder()

    def broken(stats: BatchStats) -> None:
        raise RuntimeError("metrics broke")

    batcher = Batcher(backend, pad, on_batch=broken)
    batcher.start()
    try:
        for i in range(3):
            logits, _ = await batcher.submit([[i + 1]])
            assert logits[0, 0] == i + 1
    finally:
        await batcher.stop()


async def test_a_dead_worker_is_restarted_and_unhealthy_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = Recorder()
    async with Running(backend) as batcher:
        original = batcher._take
        failures = {"left": 1}

        def take_failing_once():
            if failures["left"]:
                failures["left"] -= 1
                batch = original()
                batcher._running = batch  # the worker dies holding this batch
                raise RuntimeError("worker bug")
            return original()

        monkeypatch.setattr(batcher, "_take", take_failing_once)
        with pytest.raises(Exception, match="batcher failed"):
            await batcher.submit([[1]])
        assert batcher.restarts == 1
        await wait_until(lambda: batcher.healthy)
        logits, _ = await batcher.submit([[5]])
        assert logits[0, 0] == 5


async def test_a_stuck_backend_makes_the_batcher_unhealthy() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, stall_after_s=0.05) as batcher:
        task = asyncio.create_task(batcher.submit([[1]]))
        await wait_until(backend.entered.is_set)
        await asyncio.sleep(0.1)
        assert not batcher.healthy
        backend.gate.set()
        await task
        assert batcher.healthy


# ---------------------------------------------------------------- deadline-aware admission (issue 13)


async def test_work_that_cannot_meet_its_deadline_is_refused_at_once() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_queue=10_000) as batcher:
        batcher.calibrate(0.01)  # seconds per padded token; these rows are one token wide
        held = asyncio.create_task(batcher.submit([[1]] * 50))  # 0.5 s of work queued
        await wait_until(backend.entered.is_set)
        now = asyncio.get_running_loop().time()
        batcher.admit([[1]] * 10, time.perf_counter() + 5.0)  # fits
        with pytest.raises(QueueFullError, match="capacity") as refused:
            batcher.admit([[1]] * 10, time.perf_counter() + 0.1, passes=2)
        assert refused.value.retry_after_s >= 1
        assert asyncio.get_running_loop().time() - now < 0.05  # refused now, not after the deadline
        backend.gate.set()
        await held


async def test_priority_rows_go_first_and_are_not_refused_for_a_full_queue() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_queue=2, max_batch_size=1) as batcher:
        first = asyncio.create_task(batcher.submit([[1]]))
        await wait_until(backend.entered.is_set)
        queued = asyncio.create_task(batcher.submit([[2], [3]]))
        await wait_until(lambda: batcher.pending == 2)
        second_pass = asyncio.create_task(batcher.submit([[9]], priority=True))
        await wait_until(lambda: batcher.pending == 3)
        backend.gate.set()
        await asyncio.gather(first, queued, second_pass)
    assert [b[0][0] for b in backend.batches] == [1, 9, 2, 3]


async def test_admission_keeps_headroom_for_an_estimate_that_runs_late() -> None:
    """The estimate counts backend compute only; work estimated to need most of its time is refused."""
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_queue=10_000) as batcher:
        batcher.calibrate(0.01)
        held = asyncio.create_task(batcher.submit([[1]] * 60))  # ~0.6 s queued
        await wait_until(backend.entered.is_set)
        batcher.admit([[1]] * 5, time.perf_counter() + 2.0)  # ~0.65 s of a 2 s budget: admitted
        with pytest.raises(QueueFullError, match="too close"):
            batcher.admit([[1]] * 5, time.perf_counter() + 1.0)  # ~0.65 s of a 1 s budget: refused
        backend.gate.set()
        await held


# ---------------------------------------------------------------- the cost model: padded tokens (issue 28)


def test_a_request_costs_rows_x_longest_row_x_passes() -> None:
    rows = [[1] * 10, [1] * 3]
    assert padded_tokens(rows) == 2 * 10
    assert padded_tokens(rows, passes=2) == 2 * 10 + 2 * 11  # pass 2 rows carry the RAP id
    assert padded_tokens([]) == 0


def test_the_rate_follows_slower_work_but_never_drops_below_its_calibrated_floor() -> None:
    rate = MeasuredRate()
    assert rate.seconds == 0.0  # nothing measured: nothing refused
    rate.calibrate(1e-3)
    for _ in range(50):
        rate.observe(1e-3, 100)  # 1e-5 s per unit: cheap work
    assert rate.seconds == 1e-3
    rate.observe(0.5, 100)  # 5e-3 s per unit: a slower machine now
    assert rate.seconds == pytest.approx(1e-3 + 0.2 * (5e-3 - 1e-3))


async def test_long_rows_are_refused_where_as_many_short_rows_fit() -> None:
    """Admission used to cost a row the same whatever its length."""
    async with Running(Recorder()) as batcher:
        batcher.calibrate(1e-3)
        batcher.admit([[1] * 5] * 100, time.perf_counter() + 2.0)  # 100 x 5 x 1 ms = 0.5 s
        with pytest.raises(QueueFullError, match="capacity"):
            batcher.admit([[1] * 60] * 100, time.perf_counter() + 2.0)  # 100 x 60 x 1 ms = 6 s


async def test_cheap_batches_cannot_make_a_long_request_look_cheap() -> None:
    """The measured attack: many one-token rows pulled a per-row estimate down ~60x."""
    async with Running(Recorder(), max_queue=10_000) as batcher:
        batcher.calibrate(1e-3)
        for _ in range(10):
            await batcher.submit([[1]] * 64)  # the recorder answers at once: ~1e-6 s per token
        assert batcher.seconds_per_token.seconds == 1e-3
        with pytest.raises(QueueFullError):
            batcher.admit([[1] * 32] * 208, time.perf_counter() + 10.0, passes=2)  # 13,520 tokens: 13.5 s


async def test_queued_and_running_work_is_counted_in_padded_tokens() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_batch_size=10) as batcher:
        batcher.calibrate(1e-3)
        held = asyncio.create_task(batcher.submit([[1] * 50] * 10))  # running: 500 tokens
        await wait_until(backend.entered.is_set)
        queued = asyncio.create_task(batcher.submit([[2] * 20, [2]]))  # queued: 2 rows padded to 20
        await wait_until(lambda: batcher.pending == 2)
        assert batcher.estimated_wait_s(0) == pytest.approx((500 + 40) * 1e-3)
        assert batcher.estimated_wait_s(100) == pytest.approx((500 + 40 + 100) * 1e-3)
        backend.gate.set()
        await asyncio.gather(held, queued)
        assert batcher.estimated_wait_s(0) == 0.0


async def test_the_later_passes_of_admitted_work_count_until_it_ends() -> None:
    """Pass 2 joins the queue at its front: work admitted meanwhile must count it."""
    async with Running(Recorder()) as batcher:
        batcher.calibrate(1e-3)
        with batcher.admitted([[1] * 9] * 4, time.perf_counter() + 5.0, passes=2):
            assert batcher.estimated_wait_s(0) == pytest.approx(4 * 10 * 1e-3)
        assert batcher.estimated_wait_s(0) == 0.0


# ------------------------------------------------------------------ length-aware batching


def _mixed_lengths() -> list[list[int]]:
    """Rows of 2 and 20 tokens, interleaved: first come, first served pads every batch to 20."""
    return [[i] * (2 if i % 2 else 20) for i in range(1, 17)]


async def _padding_share(max_padding_share: float) -> tuple[float, Recorder, list[BatchStats]]:
    backend = Recorder()
    backend.gate = threading.Event()
    running = Running(backend, max_batch_size=4, max_padding_share=max_padding_share)
    async with running as batcher:
        first = asyncio.create_task(batcher.submit([[99]]))
        await wait_until(backend.entered.is_set)
        rows = _mixed_lengths()
        queued = asyncio.create_task(batcher.submit(rows))  # all queued while the first batch runs
        await wait_until(lambda: batcher.pending == len(rows))
        backend.gate.set()
        await first
        logits, _ = await queued
    assert logits[:, 0].tolist() == [row[0] for row in rows]  # answers in row order, whatever the batches
    stats = running.stats[1:]
    padded = sum(s.padded_tokens for s in stats)
    return (padded - sum(s.real_tokens for s in stats)) / padded, backend, stats


async def test_length_aware_grouping_keeps_padding_small() -> None:
    in_order, _, _ = await _padding_share(1.0)
    grouped, backend, stats = await _padding_share(0.25)
    assert in_order == pytest.approx(1 - (8 * 2 + 8 * 20) / (16 * 20))  # every batch padded to 20: 45%
    assert grouped == 0.0  # short rows batch with short rows, long with long
    assert {len(set(map(len, batch))) for batch in backend.batches[1:]} == {1}
    assert [s.rows for s in stats] == [4, 4, 4, 4]


async def test_grouping_always_takes_the_oldest_row_first() -> None:
    _, backend, _ = await _padding_share(0.25)
    firsts = [batch[0][0] for batch in backend.batches[1:]]
    assert firsts[0] == 1  # the head of the queue leads the first batch
    assert firsts == sorted(firsts)  # and every later batch starts with the oldest row left


async def test_grouping_keeps_priority_rows_first() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_batch_size=2, max_padding_share=0.25) as batcher:
        first = asyncio.create_task(batcher.submit([[1]]))
        await wait_until(backend.entered.is_set)
        queued = asyncio.create_task(batcher.submit([[2], [3] * 9, [4] * 9]))
        await wait_until(lambda: batcher.pending == 3)
        second_pass = asyncio.create_task(batcher.submit([[9] * 9], priority=True))
        await wait_until(lambda: batcher.pending == 4)
        backend.gate.set()
        await asyncio.gather(first, queued, second_pass)
    # the pass-2 row leads, joined by a row of its length; the short row waits for the next batch
    assert [[r[0] for r in b] for b in backend.batches] == [[1], [9, 3], [2], [4]]


async def test_grouping_respects_max_batch_tokens_and_skips_done_rows() -> None:
    backend = Recorder()
    backend.gate = threading.Event()
    async with Running(backend, max_batch_size=32, max_batch_tokens=16, max_padding_share=0.5) as batcher:
        first = asyncio.create_task(batcher.submit([[1]]))
        await wait_until(backend.entered.is_set)
        abandoned = asyncio.create_task(batcher.submit([[7] * 8]))
        rows = asyncio.create_task(batcher.submit([[2] * 8, [3] * 8, [4] * 8]))
        await wait_until(lambda: batcher.pending == 4)
        abandoned.cancel()
        backend.gate.set()
        await asyncio.gather(first, rows)
    assert [[r[0] for r in b] for b in backend.batches] == [[1], [2, 3], [4]]  # 2 x 8 = 16 tokens at most


@pytest.mark.parametrize("padding_share", [1.0, 0.5])  # first come first served, and length-aware grouping
async def test_reader_rows_run_on_the_reader_graph_in_batches_of_their_own(padding_share: float) -> None:
    backend, reader = Recorder(), Recorder()
    backend.gate = threading.Event()
    running = Running(backend, max_batch_size=32, max_wait_s=0, max_padding_share=padding_share, reader=reader)
    async with running as batcher:
        first = asyncio.create_task(batcher.submit([[1, 1]], tag="1"))
        await wait_until(backend.entered.is_set)
        mixed = [asyncio.create_task(batcher.submit([[i, i]], tag=("R" if i % 2 else "2"))) for i in range(2, 8)]
        await wait_until(lambda: batcher.pending == 6)
        backend.gate.set()
        results = await asyncio.gather(first, *mixed)
    assert [r for b in reader.batches for r in b] and all(row[0] % 2 for b in reader.batches for row in b)
    assert all(row[0] % 2 == 0 or row[0] == 1 for b in backend.batches for row in b)
    assert sorted(r[0] for b in reader.batches for r in b) == [3, 5, 7]
    assert [logits[0, 0] for logits, _ in results] == list(range(1, 8))  # each row's answer is its own


async def test_reader_rows_without_a_reader_graph_fail_and_nothing_else_does() -> None:
    backend = Recorder()
    async with Running(backend) as batcher:
        with pytest.raises(BackendError, match="reader graph"):
            await batcher.submit([[3, 3]], tag="R")
        logits, _ = await batcher.submit([[4, 4]], tag="2")
    assert logits.tolist() == [[4, 2]]
