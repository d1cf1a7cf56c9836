"""What `calibrate rap` warns about in its summary (calibrate.rap.summary)."""

from __future__ import annotations

import pytest

from calibrate.rap.summary import threshold_warnings
from tests.server_fixtures import manifest


@pytest.mark.parametrize(("statistic", "warned"), [("floored", True), ("logodds", True), ("perturbed", False)])
def test_a_threshold_of_no_drop_is_warned_about_under_a_drop_statistic(statistic: str, warned: bool) -> None:
    """Under a drop (and floored: a drop above the floor) a threshold >= 0 flags only inputs that GAIN
    log-odds; `perturbed` is where the input lands, any threshold is meaningful."""
    recorded = manifest()
    (label,) = recorded.protect
    no_drop = label.model_copy(update={"thresholds": {"0.01": 0.25}, "floor": 1.0})
    warnings = threshold_warnings(recorded.model_copy(update={"statistic": statistic, "protect": [no_drop]}))
    assert bool(warnings) is warned
    assert all("no drop" in w for w in warnings)
