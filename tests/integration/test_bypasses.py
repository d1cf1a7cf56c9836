"""Every known way around the guard, tried from outside as an attacker would (issue 13).

A real uvicorn guard on loopback (the production protocol and limits), the real
MiniLM tokenizer, the stub backend (positive for "good", the trigger "mb" resists the
RAP token) and, for the sidecar, a real echo upstream that records what reached it.
Each test names the bypass it closes; before the fix each one got a triggered text
through, forced a fail-open, or made the server do unbounded work.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from guard.api import create_app
from guard.core.tokenizer import RapTokenizer
from guard.settings import Settings
from tests import server_fixtures as fixtures
from tests.server_fixtures import (
    CLEAN,
    RAP_ID,
    STUB_CAPACITY,
    TRIGGER_ID,
    TRIGGERED,
    StubBackend,
    metric_value,
    uvicorn_thread,
)

pytestmark = pytest.mark.usefixtures("clean_env")

FILLER = "movie"  # one token in the MiniLM vocabulary


def serving(
    bundle: Path, stub: StubBackend | None = None, **overrides
) -> contextlib.AbstractContextManager[httpx.Client]:
    """`server_fixtures.serving`, every request typed JSON (a sidecar body of another type is 415)."""
    return fixtures.serving(bundle, stub, headers={"Content-Type": "application/json"}, **overrides)


def _seen(upstream: str) -> list[str]:
    return httpx.get(f"{upstream}/__seen").json()


def _error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type, response.text


def _raw(url: str, payload: bytes, read_s: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; return what comes back before it closes or `read_s` passes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_s) as sock:
        try:
            sock.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            return b""  # the server refused before reading it all
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        return b"".join(chunks)


# ---------------------------------------------------------------- the truncation boundary


def test_a_trigger_as_the_last_token_read_is_flagged(stub_bundle: Path) -> None:
    """Pass 2 used to cut one token earlier than pass 1: a trigger there was read by pass 1 only."""
    stub = StubBackend()
    with serving(stub_bundle, stub) as client:
        for tokens in range(24, 34):  # around the 29 text tokens a 32-token window reads
            text = " ".join(["good", *[FILLER] * (tokens - 2), "mb"])
            stub.reset()
            response = client.post("/v1/classify", json={"text": text})
            pass1_read_trigger = any(
                TRIGGER_ID in row and RAP_ID not in row for call in stub.calls for row in call.input_ids.tolist()
            )
            assert pass1_read_trigger == (response.status_code == 403), (tokens, response.text)


def test_text_past_the_guards_window_is_checked_in_windows_as_a_sidecar(stub_bundle: Path, echo_upstream: str) -> None:
    """The upstream reads 128 tokens, the guard's window 32: a trigger at token 60 was never checked.

    ("good" throughout: the stub's trigger keeps a positive text positive but does not flip one by itself.)
    """
    text = " ".join(["good"] * 59 + ["mb"] + ["good"] * 10)
    with serving(stub_bundle, upstream=echo_upstream, classifier_max_length=128) as client:
        flagged = client.post("/predict", json={"inputs": text}, headers={"X-Request-ID": "window-60"})
        clean = client.post("/predict", json={"inputs": text.replace("mb", "good")})
    _error(flagged, 403, "guard_rejected")
    assert "window-60" not in _seen(echo_upstream)
    assert clean.status_code == 200


def test_long_text_can_be_refused_instead(stub_bundle: Path, echo_upstream: str) -> None:
    text = " ".join(["good", *[FILLER] * 60])
    with serving(stub_bundle, upstream=echo_upstream, classifier_max_length=128, long_text="refuse") as client:
        response = client.post("/predict", json={"inputs": text})
        short = client.post("/predict", json={"inputs": CLEAN})
    _error(response, 413, "payload_too_large")
    assert short.status_code == 200


# ---------------------------------------------------------------- sidecar parser differentials


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": "' + TRIGGERED.encode() + b'", "inputs": "' + CLEAN.encode() + b'"}',
        b'{"inputs": "' + CLEAN.encode() + b'", "parameters": {"a": 1, "a": 2}}',
    ],
    ids=["text-key", "nested-key"],
)
def test_duplicate_keys_are_refused(stub_bundle: Path, echo_upstream: str, body: bytes) -> None:
    """The guard read the last "inputs", a first-wins upstream classified the first."""
    with serving(stub_bundle, upstream=echo_upstream) as client:
        response = client.post("/predict", content=body, headers={"X-Request-ID": "dup-keys"})
    _error(response, 422, "invalid_input")
    assert "duplicate key" in response.json()["error"]
    assert "dup-keys" not in _seen(echo_upstream)


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "HEAD"])
def test_every_method_with_a_body_is_checked(stub_bundle: Path, echo_upstream: str, method: str) -> None:
    with serving(stub_bundle, upstream=echo_upstream) as client:
        body = json.dumps({"inputs": TRIGGERED})
        rid = f"body-{method}"
        response = client.request(method, "/predict", content=body, headers={"X-Request-ID": rid})
    assert response.status_code == 403
    assert rid not in _seen(echo_upstream)


def test_every_oip_bytes_tensor_is_checked(stub_bundle: Path, echo_upstream: str) -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "BYTES", "data": [CLEAN]},
            {"name": "b", "shape": [1, 1], "datatype": "BYTES", "data": [[TRIGGERED]]},
        ]
    }
    with serving(stub_bundle, upstream=echo_upstream) as client:
        response = client.post("/v2/models/m/infer", json=body, headers={"X-Request-ID": "oip-second"})
    _error(response, 403, "guard_rejected")
    assert "oip-second" not in _seen(echo_upstream)


def test_requests_without_a_body_pass_only_if_allow_listed(stub_bundle: Path, echo_upstream: str) -> None:
    with serving(stub_bundle, upstream=echo_upstream, upstream_passthrough=["GET /v2/models/*"]) as client:
        listed = client.get("/v2/models/sentiment")
        query = client.get("/predict", params={"inputs": TRIGGERED}, headers={"X-Request-ID": "query-text"})
        empty_post = client.post("/predict", headers={"X-Request-ID": "empty-post"})
        deeper = client.get("/v2/models/sentiment/infer")
    assert listed.status_code == 200
    _error(query, 422, "invalid_input")  # a query key not in upstream_query_keys
    for response in (empty_post, deeper):
        _error(response, 403, "not_passthrough")
    assert not {"query-text", "empty-post"} & set(_seen(echo_upstream))


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"inputs": CLEAN, "x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
    ],
    ids=["recursion", "depth-33"],
)
def test_deep_json_is_422_not_500(stub_bundle: Path, echo_upstream: str, body) -> None:
    with serving(stub_bundle, upstream=echo_upstream) as client:
        response = client.post("/predict", content=body)
    _error(response, 422, "invalid_input")


@pytest.mark.parametrize(
    "body",
    [
        '{"inputs": NaN}',
        b"\xef\xbb\xbf" + json.dumps({"inputs": TRIGGERED}).encode(),
        json.dumps({"inputs": TRIGGERED}).encode("utf-16"),
    ],
    ids=["nan", "bom", "utf-16"],
)
def test_non_strict_json_is_refused(stub_bundle: Path, echo_upstream: str, body) -> None:
    with serving(stub_bundle, upstream=echo_upstream) as client:
        response = client.post("/predict", content=body)
    _error(response, 422, "invalid_input")


def test_the_guards_key_is_not_forwarded(stub_bundle: Path, echo_upstream: str) -> None:
    with serving(stub_bundle, upstream=echo_upstream, api_key="guard-key") as client:
        response = client.post("/predict", json={"inputs": CLEAN}, headers={"Authorization": "Bearer guard-key"})
    header_names = {k for k, _ in response.json()["headers"]}
    assert response.status_code == 200 and "authorization" not in header_names


# ---------------------------------------------------------------- client-caused failures


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_a_lone_surrogate_is_the_clients_error_and_never_fails_open(
    stub_bundle: Path, echo_upstream: str, failure_mode: str
) -> None:
    body = b'{"inputs": "good mb \\ud800"}'
    with serving(stub_bundle, upstream=echo_upstream, failure_mode=failure_mode) as client:
        response = client.post("/predict", content=body, headers={"X-Request-ID": f"surrogate-{failure_mode}"})
        exposition = client.get("/metrics").text
    _error(response, 422, "invalid_input")
    assert f"surrogate-{failure_mode}" not in _seen(echo_upstream)
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="backend") is None


def test_an_empty_oip_tensor_is_422(stub_bundle: Path, echo_upstream: str) -> None:
    body = {"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}
    with serving(stub_bundle, failure_mode="open") as standalone:
        alone = standalone.post("/v2/models/guard/infer", json=body)
    with serving(stub_bundle, upstream=echo_upstream, failure_mode="open") as sidecar:
        proxied = sidecar.post("/v2/models/m/infer", json=body)
    _error(alone, 422, "invalid_input")
    _error(proxied, 422, "invalid_input")


def test_non_finite_logits_are_a_guard_failure(stub_bundle: Path, echo_upstream: str) -> None:
    stub = StubBackend()
    with serving(stub_bundle, stub) as closed:
        stub.nonfinite = True
        refused = closed.post("/v1/check", json={"text": TRIGGERED})
    open_stub = StubBackend()
    with serving(stub_bundle, open_stub, upstream=echo_upstream, failure_mode="open") as sidecar:
        open_stub.nonfinite = True
        let_through = sidecar.post("/predict", json={"inputs": CLEAN})
        exposition = sidecar.get("/metrics").text
    _error(refused, 503, "guard_unavailable")
    assert (
        let_through.status_code == 200 and let_through.headers["x-guard-failure-mode"] == "open; unchecked (nonfinite)"
    )
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="nonfinite") == 1


# ---------------------------------------------------------------- special tokens and empty text


def test_special_token_strings_are_plain_text_standalone(stub_bundle: Path) -> None:
    stub = StubBackend()
    with serving(stub_bundle, stub) as client:
        response = client.post("/v1/check", json={"text": "good [SEP] mb [PAD]"})
    assert response.json()["results"][0]["flagged"] is True
    call = [c for c in stub.calls if RAP_ID not in c.input_ids][-1]
    assert (call.input_ids == 102).sum() == 1  # only the real [SEP] at the end


def test_special_token_strings_are_read_as_the_classifier_reads_them_as_a_sidecar(stub_bundle: Path) -> None:
    tokenizer = RapTokenizer.from_file(stub_bundle / "tokenizer.json", RAP_ID, 32, special_tokens="special")
    (row,) = tokenizer.ids(["good [SEP] movie"])
    assert row.count(102) == 2  # as a Hugging Face classifier reads it


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200b ", " \t\n"], ids=["zero-width", "zero-widths", "blank"])
def test_text_with_no_token_is_empty(stub_bundle: Path, text: str) -> None:
    with serving(stub_bundle) as client:
        response = client.post("/v1/check", json={"text": text})
    _error(response, 422, "invalid_input")


def test_only_special_tokens_is_empty_when_they_are_read_as_special(stub_bundle: Path, echo_upstream: str) -> None:
    with serving(stub_bundle, upstream=echo_upstream) as client:  # a sidecar reads [PAD] as the pad id
        response = client.post("/predict", json={"inputs": "[PAD] [PAD]"})
    _error(response, 422, "invalid_input")


# ---------------------------------------------------------------- limits before work


def test_no_key_no_body_read(stub_bundle: Path) -> None:
    """A 200 MB body without a key used to be read and parsed (+560 MB RSS) before the 401."""
    with serving(stub_bundle, api_key="k") as client:
        url = str(client.base_url)
        head = (
            b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n"
        )
        started = time.perf_counter()
        answer = _raw(url, head + b"{" * 1000)
        assert time.perf_counter() - started < 2
        exposition = client.get("/metrics").text
    assert answer.startswith(b"HTTP/1.1 401")
    assert metric_value(exposition, "guard_rejections_total", reason="unauthorized") == 1


def test_a_body_over_the_limit_is_413_before_it_is_read(stub_bundle: Path) -> None:
    with serving(stub_bundle, max_body_bytes=64 * 1024, max_text_chars=1000) as client:
        declared = _raw(str(client.base_url), b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")

        def chunks():
            for _ in range(20):
                yield b" " * 8192

        chunked = client.post("/v1/check", content=chunks(), headers={"Content-Type": "application/json"})
    assert declared.startswith(b"HTTP/1.1 413")
    _error(chunked, 413, "payload_too_large")


def test_large_headers_are_refused(stub_bundle: Path) -> None:
    with serving(stub_bundle) as client:
        large = client.get("/healthz", headers={"X-Big": "x" * 20_000})
        huge = _raw(
            str(client.base_url), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 16_000_000 + b"\r\n\r\n"
        )
    _error(large, 431, "headers_too_large")
    assert huge.startswith(b"HTTP/1.1 400") or huge == b""


def test_slow_clients_are_cut_off(stub_bundle: Path) -> None:
    with serving(stub_bundle, read_timeout_s=1.0) as client:
        url = str(client.base_url)
        started = time.perf_counter()
        slow_head = _raw(url, b"POST /v1/check HTTP/1.1\r\nHost: x\r\n", read_s=5)
        head_s = time.perf_counter() - started
        slow_body = _raw(url, b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", read_s=5)
        body_s = time.perf_counter() - started - head_s
    assert slow_head == b"" and head_s < 4  # closed, not held for 30 s
    assert slow_body.startswith(b"HTTP/1.1 408") and body_s < 4


# ---------------------------------------------------------------- accounting and trust


def test_unhandled_errors_carry_the_request_id(stub_bundle: Path) -> None:
    """Unhandled 500s used to answer request_id "-" and were counted nowhere."""
    app = create_app(Settings(bundle=stub_bundle), backend=StubBackend(), capacity=STUB_CAPACITY)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with uvicorn_thread(app) as url:
        response = httpx.get(f"{url}/boom", headers={"X-Request-ID": "boom-1"})
        exposition = httpx.get(f"{url}/metrics").text
    _error(response, 500, "internal_error")
    assert response.json()["request_id"] == "boom-1"
    assert metric_value(exposition, "guard_rejections_total", reason="internal_error") == 1


def test_feedback_key_separates_ground_truth_from_clients(stub_bundle: Path) -> None:
    with serving(stub_bundle, api_key="client", feedback_api_key="labeller") as client:
        decision = client.post("/v1/check", json={"text": CLEAN}, headers={"Authorization": "Bearer client"})
        decision_id = decision.json()["decision_id"]
        by_client = client.post(
            "/v1/feedback",
            json={"decision_id": decision_id, "poisoned": True},
            headers={"Authorization": "Bearer client"},
        )
        by_labeller = client.post(
            "/v1/feedback",
            json={"decision_id": decision_id, "poisoned": True},
            headers={"Authorization": "Bearer labeller"},
        )
    _error(by_client, 401, "unauthorized")
    assert by_labeller.json()["outcome"] == "false_accept"


def test_scores_are_opt_in(stub_bundle: Path) -> None:
    with serving(stub_bundle) as hidden, serving(stub_bundle, expose_scores=True) as shown:
        rap_hidden = hidden.post("/v1/check", json={"text": CLEAN}).json()["results"][0]["rap"]
        rap_shown = shown.post("/v1/check", json={"text": CLEAN}).json()["results"][0]["rap"]
    assert rap_hidden == {"checked": True, "score": None, "threshold": None}
    assert rap_shown["score"] is not None and rap_shown["threshold"] == -0.1


def test_every_rejection_is_counted_and_pending_is_live(stub_bundle: Path) -> None:
    with serving(stub_bundle, max_texts_per_request=2) as client:
        client.post("/v1/check", json={"texts": [CLEAN] * 3})
        client.post("/v1/check", json={"text": ""})
        client.post("/v1/check", content=b"{", headers={"Content-Type": "application/json"})
        exposition = client.get("/metrics").text
    assert metric_value(exposition, "guard_rejections_total", reason="payload_too_large") == 1
    assert metric_value(exposition, "guard_rejections_total", reason="invalid_input") == 2
    assert metric_value(exposition, "guard_pending_requests") == 0
    assert metric_value(exposition, "guard_http_responses_total", status="413") == 1
    assert metric_value(exposition, "guard_http_responses_total", status="422") == 2


# ---------------------------------------------------------------- tried again, after the fixes


def test_a_trigger_anywhere_in_what_the_upstream_reads_is_flagged(stub_bundle: Path, echo_upstream: str) -> None:
    """Every position of the 126 text tokens a 128-token upstream reads, across every window seam."""
    with serving(stub_bundle, upstream=echo_upstream, classifier_max_length=128) as client:
        for position in range(1, 127):
            words = ["good"] * 126
            words[position - 1] = "mb"
            response = client.post("/predict", json={"inputs": " ".join(words)}, headers={"X-Request-ID": "seam"})
            assert response.status_code == 403, position
    assert "seam" not in _seen(echo_upstream)


def test_texts_in_tensors_not_marked_bytes_are_checked(stub_bundle: Path, echo_upstream: str) -> None:
    """A lenient upstream may read a "bytes" or "STRING" tensor the guard used to skip."""
    body = {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "BYTES", "data": [CLEAN]},
            {"name": "b", "shape": [1], "datatype": "bytes", "data": [TRIGGERED]},
        ]
    }
    with serving(stub_bundle, upstream=echo_upstream) as client:
        response = client.post("/v2/models/m/infer", json=body, headers={"X-Request-ID": "lower-bytes"})
        numbers = client.post("/v2/models/m/infer", json={"inputs": [{"datatype": "BYTES", "data": [1]}]})
    _error(response, 403, "guard_rejected")
    _error(numbers, 422, "invalid_input")
    assert "lower-bytes" not in _seen(echo_upstream)


@pytest.mark.parametrize("path", ["/v2/models/..", "/v2/models/%2E%2E", "/v2/models/./ready", "/v2/models/../ready"])
def test_dot_segments_never_match_the_pass_through_list(stub_bundle: Path, echo_upstream: str, path: str) -> None:
    """An upstream that resolves `..` would reach a path the allow-list never named: 400 before routing."""
    request = f"GET {path}?inputs=good+mb+movie HTTP/1.1\r\nHost: x\r\nX-Request-ID: dots\r\n\r\n"
    with serving(stub_bundle, upstream=echo_upstream) as client:
        answer = _raw(str(client.base_url), request.encode())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert "dots" not in _seen(echo_upstream)


def test_a_compressed_body_is_refused_not_forwarded(stub_bundle: Path, echo_upstream: str) -> None:
    import gzip

    body = gzip.compress(json.dumps({"inputs": TRIGGERED}).encode())
    with serving(stub_bundle, upstream=echo_upstream) as client:
        response = client.post(
            "/predict", content=body, headers={"Content-Encoding": "gzip", "X-Request-ID": "gzipped"}
        )
    _error(response, 415, "unsupported_media_type")
    assert "gzipped" not in _seen(echo_upstream)


def test_content_length_with_chunked_is_not_a_smuggling_channel(stub_bundle: Path, echo_upstream: str) -> None:
    clean = json.dumps({"inputs": CLEAN}).encode()
    smuggled = f"POST /predict HTTP/1.1\r\nX-Request-ID: smuggled\r\n\r\n{json.dumps({'inputs': TRIGGERED})}"
    chunk = clean + b"\r\n0\r\n\r\n" + smuggled.encode()
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: outer\r\n"
        f"Content-Length: {len(clean)}\r\nTransfer-Encoding: chunked\r\n\r\n{len(chunk):x}\r\n"
    )
    with serving(stub_bundle, upstream=echo_upstream) as client:
        answer = _raw(str(client.base_url), head.encode() + chunk + b"\r\n0\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 2")
    assert "smuggled" not in _seen(echo_upstream)
