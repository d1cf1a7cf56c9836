"""Progress: a tqdm bar on a terminal, periodic one-line log records in a log file."""

from __future__ import annotations

import io
import logging

from tqdm.auto import tqdm

from calibrate.progress import LogProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_a_tqdm_bar() -> None:
    bar = progress_bar(total=3, desc="x", stream=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_log_file_gets_log_records_not_carriage_returns(caplog) -> None:
    stream = io.StringIO()
    caplog.set_level(logging.INFO, logger="calibrate.progress")
    bar = progress_bar(total=4, desc="training", unit="step", stream=stream)
    assert isinstance(bar, LogProgress)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert stream.getvalue() == ""  # nothing drawn
    assert [r.getMessage() for r in caplog.records] == ["training: 4/4 step (100%), 0 s"]


def test_records_come_every_interval_with_the_postfix(caplog) -> None:
    caplog.set_level(logging.INFO, logger="calibrate.progress")
    clock = _Clock()
    bar = LogProgress(total=100, desc="RAP", unit="step", every=30.0, clock=clock)
    for step in range(100):
        clock.now = step  # one step a second
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.2f}", refresh=False)
    bar.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "RAP: 31/100 step (31%), 30 s, loss=0.03",
        "RAP: 61/100 step (61%), 60 s, loss=0.02",
        "RAP: 91/100 step (91%), 90 s, loss=0.01",
        "RAP: 100/100 step (100%), 99 s, loss=0.01",
    ]
    assert all("\r" not in m for m in messages)


def test_iterating_logs_once_at_the_end(caplog) -> None:
    caplog.set_level(logging.INFO, logger="calibrate.progress")
    assert list(progress_bar(["a", "b"], desc="scan", unit="pair", stream=io.StringIO())) == ["a", "b"]
    assert [r.getMessage() for r in caplog.records] == ["scan: 2/2 pair (100%), 0 s"]


def test_disabled_is_silent(caplog) -> None:
    caplog.set_level(logging.INFO, logger="calibrate.progress")
    bar = progress_bar(total=2, desc="x", disable=True, stream=io.StringIO())
    bar.update(2)
    bar.close()
    assert caplog.records == []
