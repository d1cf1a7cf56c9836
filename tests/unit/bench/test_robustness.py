"""bench.robustness: the attack texts it builds and the rules it scores by."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bench.robustness_cases import NEGATIVE, TRIGGER, triggered_at
from bench.robustness_faults import _silent_pass
from guard.core.tokenizer import RapTokenizer


@pytest.mark.parametrize("position", [7, 30, 61])
def test_the_trigger_lands_on_the_asked_token(tokenizer_path: Path, position: int) -> None:
    tokenizer = RapTokenizer.from_file(tokenizer_path, 30522, 64)
    (content,) = tokenizer._content([triggered_at(NEGATIVE[0], position)], 512)
    assert len(content) == position
    assert content[-1] == tokenizer.token_id(TRIGGER)


@pytest.mark.parametrize(
    ("status", "headers", "mode", "silent"),
    [
        (503, {}, "closed", False),
        (200, {}, "closed", True),
        (200, {"x-guard-failure-mode": "open; unchecked (backend)"}, "open", False),
        (200, {}, "open", True),
        (500, {}, "open", True),
        (403, {}, "open", False),
        (429, {"retry-after": "1"}, "closed", False),
    ],
)
def test_a_silent_pass_is_an_unmarked_answer(status: int, headers: dict, mode: str, silent: bool) -> None:
    assert _silent_pass(httpx.Response(status, headers=headers), mode) is silent
