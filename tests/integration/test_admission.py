"""Nothing a client sends can make the guard skip, shorten or time out its check (issue 28, parts 2 and 3).

A real uvicorn guard on loopback, the real MiniLM tokenizer, the stub backend ("good" is
positive, the trigger "mb" resists the RAP token) and, for the sidecar, a real echo
upstream that records the request ids that reached it. Before the fixes: a sidecar read
only its own 29-token window; ten cheap requests made a long one look cheap, so it was
admitted, ran past its deadline and was let through unchecked (failure_mode=open) or
failed everyone queued behind it (closed).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from guard.core.types import EncodedBatch
from tests.server_fixtures import CLEAN, TRIGGERED, StubBackend, metric_value, serving

pytestmark = pytest.mark.usefixtures("clean_env")

ZERO_WIDTH_THEN_TRIGGER = "\u200b" * 10_000 + " " + TRIGGERED


@dataclass
class TokenTimedStub(StubBackend):
    """The stub, taking time in proportion to each call's padded tokens, as a transformer does."""

    seconds_per_token: float = 1e-4

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        time.sleep(batch.input_ids.size * self.seconds_per_token)
        return super().infer(batch)


def _seen(upstream: str) -> list[str]:
    return httpx.get(f"{upstream}/__seen").json()


def _error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type, response.text
    assert "x-guard-failure-mode" not in response.headers


# ---------------------------------------------------------------- part 2: every token the upstream reads


def test_a_sidecar_checks_the_whole_text_by_default(stub_bundle: Path, echo_upstream: str) -> None:
    """A Hugging Face pipeline upstream reads 512 tokens; the guard read its own 29 unless told."""
    text = " ".join(["good"] * 100 + ["mb"] + ["good"] * 10)
    with serving(stub_bundle, upstream=echo_upstream) as client:
        flagged = client.post("/predict", json={"inputs": text}, headers={"X-Request-ID": "token-101"})
        clean = client.post("/predict", json={"inputs": text.replace("mb", "good")})
    _error(flagged, 403, "guard_rejected")
    assert "token-101" not in _seen(echo_upstream)
    assert clean.status_code == 200, clean.text


def test_a_trigger_after_ten_thousand_zero_width_characters_is_flagged(stub_bundle: Path, echo_upstream: str) -> None:
    """The tokeniser reads prefixes now: characters that yield no token must not push a trigger out of them."""
    with serving(stub_bundle) as client:
        _error(client.post("/v1/classify", json={"text": ZERO_WIDTH_THEN_TRIGGER}), 403, "guard_rejected")
    with serving(stub_bundle, upstream=echo_upstream, classifier_max_length=64) as client:
        response = client.post("/predict", json={"inputs": ZERO_WIDTH_THEN_TRIGGER}, headers={"X-Request-ID": "zw"})
    _error(response, 403, "guard_rejected")
    assert "zw" not in _seen(echo_upstream)


# ---------------------------------------------------------------- part 3: deadlines no client can spend


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_cheap_requests_cannot_make_a_long_one_look_cheap(
    stub_bundle: Path, echo_upstream: str, failure_mode: str
) -> None:
    """The measured attack: ten requests of 64 one-token texts pulled a per-row estimate down; then 52
    texts of 4 windows each (plus the trigger) were admitted and ran past the deadline: an unchecked pass
    (open) or 503s for everyone admitted (closed). Now: 429 at once, and the others are answered."""
    long = " ".join(["good"] * 71)  # with a number: 72 tokens, 4 windows of a 71-token classifier
    texts = [f"{long} {i}" for i in range(51)] + [f"good mb {long}"]  # distinct: the sidecar checks each once
    settings = {"request_timeout_s": 1.0, "classifier_max_length": 71, "max_queue": 1000}
    stub = TokenTimedStub()
    with serving(stub_bundle, stub, capacity=None, upstream=echo_upstream, failure_mode=failure_mode, **settings) as c:
        for _ in range(10):
            assert c.post("/predict", json={"inputs": ["good"] * 64}).status_code == 200
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(c.post, "/predict", json={"inputs": texts}, headers={"X-Request-ID": "long"})
            time.sleep(0.05)
            other = pool.submit(c.post, "/predict", json={"inputs": CLEAN}, headers={"X-Request-ID": "other"})
            big, other = big.result(), other.result()
        exposition = c.get("/metrics").text
    _error(big, 429, "queue_full")
    assert int(big.headers["retry-after"]) >= 1
    assert other.status_code == 200, other.text
    assert "x-guard-failure-mode" not in other.headers
    assert "long" not in _seen(echo_upstream) and "other" in _seen(echo_upstream)
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") is None


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "standalone"])
def test_a_timeout_is_never_an_unchecked_pass(stub_bundle: Path, echo_upstream: str, sidecar: bool) -> None:
    """failure_mode=open covers backend faults; a timeout is a counted guard failure, answered 503."""
    stub = StubBackend()
    upstream = {"upstream": echo_upstream} if sidecar else {}
    with serving(stub_bundle, stub, request_timeout_s=0.3, failure_mode="open", **upstream) as client:
        stub.delay_pass2_s = 0.6
        if sidecar:
            response = client.post("/predict", json={"inputs": TRIGGERED}, headers={"X-Request-ID": "slow"})
        else:
            response = client.post("/v1/classify", json={"text": TRIGGERED})
        stub.delay_pass2_s = 0.0
        exposition = client.get("/metrics").text
    _error(response, 503, "guard_unavailable")
    assert "timeout" in response.json()["error"]
    assert "slow" not in _seen(echo_upstream)
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") == 1
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="timeout") is None


def test_characters_per_request_are_bounded(stub_bundle: Path, echo_upstream: str) -> None:
    with serving(stub_bundle, upstream=echo_upstream, max_request_chars=1000) as client:
        response = client.post(
            "/predict", json={"inputs": ["good " * 120, "bad " * 150]}, headers={"X-Request-ID": "big"}
        )
        fits = client.post("/predict", json={"inputs": ["good " * 90, "bad " * 110]})
    _error(response, 413, "payload_too_large")
    assert "big" not in _seen(echo_upstream)
    assert fits.status_code == 200, fits.text
