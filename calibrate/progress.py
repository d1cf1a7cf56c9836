"""Progress bars on a terminal; periodic one-line log records everywhere else.

tqdm redraws its bar with carriage returns, which a log file keeps: one training run
wrote 97 KB of `\\r` bars into a log. When stderr is not a terminal, `progress_bar`
returns a `LogProgress` instead, with the part of tqdm's interface the calibrate code
uses (`update`, `set_postfix`, `n`, `close`, iteration, `with`); it logs one line every
`LOG_EVERY_S` seconds and one when it closes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    stream=None,
) -> Any:
    """A tqdm bar when `stream` (default stderr) is a terminal, else a `LogProgress`."""
    stream = sys.stderr if stream is None else stream
    if disable or _isatty(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=stream)
    return LogProgress(iterable, total=total, desc=desc, unit=unit)


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LogProgress:
    """tqdm's counting without the drawing: a log record every `every` seconds and at the end."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        every: float = LOG_EVERY_S,
        clock=time.monotonic,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc, self.unit, self.every, self.clock = desc, unit, every, clock
        self.n = 0
        self.postfix = ""
        self.started = self.last = clock()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._log(now)

    def set_postfix(self, refresh: bool = True, **values: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._log(self.clock())

    def _log(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s %s%s, %.0f s%s", self.desc, done, self.unit, share, now - self.started, extra)


def _length(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
