"""The admission cost model that the batcher and the pipeline share: what work costs and how fast it runs.

Work is costed in padded tokens (rows x longest row x passes, `padded_tokens`); its time is
estimated from a `MeasuredRate` of seconds per unit of work, which never drops below the rate
measured at start on full-width rows: cheap requests cannot make a long one look cheap. Work
is admitted only if its estimate fits in `ADMISSION_HEADROOM` of the time its deadline leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

RATE_SMOOTHING = 0.2  # weight of the newest measure in a MeasuredRate
# Admit work only if its estimate fits in this share of the time left: the estimate counts backend
# compute, not a CPU shared with other work or the event loop's lag, which can double it.
ADMISSION_HEADROOM = 0.5


class MeasuredRate:
    """Seconds per unit of work (a padded token, a character), smoothed over the work that ran.

    Never below `floor`, the rate measured at start on the most efficient work (full-width
    rows): what ran cheaply cannot make other work look cheaper than that. 0 before any measure.
    """

    def __init__(self) -> None:
        self.floor = 0.0
        self._smoothed: float | None = None

    @property
    def seconds(self) -> float:
        return self._smoothed or 0.0

    def calibrate(self, seconds_per_unit: float) -> None:
        """The rate measured at start: the floor, and the estimate until work runs."""
        self.floor = self._smoothed = seconds_per_unit

    def observe(self, seconds: float, units: int) -> None:
        if units <= 0:
            return
        rate, old = seconds / units, self._smoothed
        smoothed = rate if old is None else old + RATE_SMOOTHING * (rate - old)
        self._smoothed = max(self.floor, smoothed)  # held at the floor, a slowdown shows at once


def padded_tokens(rows: Sequence[Sequence[int]], passes: int = 1) -> int:
    """What `passes` passes over `rows` cost the backend, batched together: rows x longest row per
    pass (pass 2 rows are one token longer: the RAP id)."""
    longest = max((len(r) for r in rows), default=0)
    return len(rows) * (passes * longest + passes - 1)
