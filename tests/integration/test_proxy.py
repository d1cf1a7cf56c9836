"""Sidecar mode end to end: real uvicorn guard on loopback in front of a real upstream process.

The upstream (echo_upstream.py) echoes what it received, so each test can see
exactly what the guard forwarded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guard.api import create_app
from guard.settings import Settings
from tests.server_fixtures import CLEAN, TRIGGERED, StubBackend, free_port, metric_value, uvicorn_thread

pytestmark = pytest.mark.usefixtures("clean_env")

JSON = {"Content-Type": "application/json"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextlib.contextmanager
def sidecar(bundle: Path, upstream: str, stub: StubBackend | None = None, **overrides) -> Iterator[httpx.Client]:
    settings = Settings(bundle=bundle, upstream=upstream, **overrides)
    with (
        uvicorn_thread(create_app(settings, backend=stub or StubBackend())) as url,
        httpx.Client(base_url=url) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def guard(stub_bundle: Path, echo_upstream: str) -> Iterator[httpx.Client]:
    """One sidecar (enforce mode, fail closed) shared by the module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("GUARD_")]:
            mp.delenv(name)
        with sidecar(stub_bundle, echo_upstream, upstream_query_keys=["x", "y", "verbose"]) as client:
            yield client


def _echo(response: httpx.Response) -> dict:
    assert response.status_code < 300 or response.headers.get("x-upstream") == "echo", response.text
    echo = response.json()
    echo["body"] = base64.b64decode(echo.pop("body_b64"))
    echo["header_names"] = {k for k, _ in echo["headers"]}
    echo["header"] = dict(echo["headers"])
    return echo


def _seen(upstream: str) -> list[str]:
    return httpx.get(f"{upstream}/__seen").json()


def test_a_clean_request_is_forwarded_as_checked(guard: httpx.Client) -> None:
    """The body and query the upstream gets are the guard's own serialisation of what it parsed and checked."""
    body = b'{"inputs":  "good movie", "parameters": {"top_k": 2}}'
    response = guard.post(
        "/models/team%2Fsentiment:predict?x=1&y=a%20b",
        content=body,
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "X-Request-ID": "fwd-1",
            "traceparent": TRACEPARENT,
            "X-Custom": "kept",
        },
    )
    assert response.status_code == 200
    echo = _echo(response)
    canonical = b'{"inputs":"good movie","parameters":{"top_k":2}}'
    assert echo["method"] == "POST"
    assert echo["path"] == "/models/team%2Fsentiment:predict?x=1&y=a+b"
    assert echo["body"] == canonical
    assert echo["header"]["content-type"] == "application/json"
    assert echo["header"]["content-length"] == str(len(canonical))
    assert echo["header"]["x-request-id"] == "fwd-1"
    assert echo["header"]["traceparent"] == TRACEPARENT
    assert echo["header"]["x-custom"] == "kept"
    assert response.headers["x-upstream"] == "echo"
    assert response.headers["x-request-id"] == "fwd-1"
    assert "compute;dur=" in response.headers["server-timing"]


def test_request_id_is_made_and_propagated_when_missing(guard: httpx.Client) -> None:
    response = guard.post("/predict", json={"inputs": CLEAN})
    rid = response.headers["x-request-id"]
    assert len(rid) == 32 and _echo(response)["header"]["x-request-id"] == rid


def test_hop_by_hop_headers_are_stripped(guard: httpx.Client) -> None:
    response = guard.post(
        "/hop",
        json={"inputs": CLEAN},
        headers={
            "Connection": "X-Hop-Named",
            "X-Hop-Named": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "Upgrade": "example/1",
            "X-End-To-End": "kept",
        },
    )
    assert response.status_code == 200
    echo = _echo(response)
    assert echo["path"] == "/hop"
    stripped = {"x-hop-named", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection", "upgrade"}
    assert not stripped & echo["header_names"]
    assert "x-hop-named" not in echo["header"].get("connection", "").lower()  # the client's own, if any
    assert echo["header"]["x-end-to-end"] == "kept"
    # and on the way back: the upstream's hop-by-hop headers stay between it and the guard
    assert "x-up-hop" not in response.headers and "keep-alive" not in response.headers
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_upstream_status_and_body_are_returned(guard: httpx.Client) -> None:
    response = guard.put("/status/418", json={"inputs": CLEAN})
    assert response.status_code == 418
    assert _echo(response)["method"] == "PUT"


def test_compressed_upstream_answers_reach_the_client_intact(guard: httpx.Client) -> None:
    response = guard.post("/gzip", json={"inputs": CLEAN})
    assert response.status_code == 200
    assert _echo(response)["path"] == "/gzip"


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "{text}"},
        {"inputs": ["good film", "{text}"]},
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["{text}"]}]},
    ],
    ids=["hf", "hf-list", "oip"],
)
def test_hf_and_oip_texts_are_found(guard: httpx.Client, echo_upstream: str, body: dict) -> None:
    def with_text(text: str) -> bytes:
        return json.dumps(body).replace("{text}", text).encode()

    def post(text: str, rid: str) -> httpx.Response:
        return guard.post("/infer", content=with_text(text), headers={"X-Request-ID": rid, **JSON})

    clean, flagged = post(CLEAN, "pointer-clean"), post(TRIGGERED, "pointer-flagged")
    assert clean.status_code == 200 and json.loads(_echo(clean)["body"]) == json.loads(with_text(CLEAN))
    assert flagged.status_code == 403
    assert flagged.json()["error_type"] == "guard_rejected"
    assert flagged.json()["request_id"] == "pointer-flagged"
    assert "pointer-flagged" not in _seen(echo_upstream)  # never reached the upstream


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"inputs=good+movie", "not JSON"),
        (b'{"text": "  "}', "no text to check"),
        (b'{"inputs": 3}', "no text to check"),
    ],
    ids=["not-json", "blank-text", "not-a-string"],
)
def test_bodies_without_a_text_are_422(guard: httpx.Client, echo_upstream: str, content: bytes, message: str) -> None:
    response = guard.post("/predict", content=content, headers={"X-Request-ID": "bad-body", **JSON})
    assert response.status_code == 422
    assert response.json()["error_type"] == "invalid_input" and message in response.json()["error"]
    assert "bad-body" not in _seen(echo_upstream)


def test_reads_are_forwarded_without_a_check(guard: httpx.Client) -> None:
    response = guard.get("/v2/models/sentiment/ready?verbose=1")
    assert response.status_code == 200
    assert _echo(response)["path"] == "/v2/models/sentiment/ready?verbose=1"


def test_the_guards_own_endpoints_are_not_forwarded(guard: httpx.Client, echo_upstream: str) -> None:
    check = guard.post("/v1/check", json={"text": CLEAN}, headers={"X-Request-ID": "own-check"})
    assert check.status_code == 200 and "results" in check.json()
    assert guard.get("/readyz").json() == {"status": "ready"}
    assert "guard_upstream_request_duration_seconds" in guard.get("/metrics").text
    assert "own-check" not in _seen(echo_upstream)


def test_shadow_mode_forwards_flagged_requests_with_a_header(stub_bundle: Path, echo_upstream: str) -> None:
    with sidecar(stub_bundle, echo_upstream, mode="shadow") as client:
        response = client.post("/predict", json={"inputs": TRIGGERED})
    assert response.status_code == 200 and response.headers["x-guard-flagged"] == "true"
    assert _echo(response)["method"] == "POST"


def test_fail_open_forwards_unchecked_requests(stub_bundle: Path, echo_upstream: str) -> None:
    stub = StubBackend()
    with sidecar(stub_bundle, echo_upstream, stub=stub, failure_mode="open") as client:
        stub.fail = RuntimeError("backend down")
        response = client.post("/predict", json={"inputs": TRIGGERED})
        exposition = client.get("/metrics").text
    assert response.status_code == 200
    assert response.headers["x-guard-failure-mode"] == "open; unchecked (backend)"
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="backend") == 1


def test_upstream_down_is_502(stub_bundle: Path) -> None:
    with sidecar(stub_bundle, f"http://127.0.0.1:{free_port()}") as client:
        response = client.post("/predict", json={"inputs": CLEAN})
        exposition = client.get("/metrics").text
    assert response.status_code == 502
    assert response.json()["error_type"] == "upstream_error"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert metric_value(exposition, "guard_upstream_request_duration_seconds_count", outcome="error") == 1


def test_slow_upstream_is_504(stub_bundle: Path, echo_upstream: str) -> None:
    with sidecar(stub_bundle, echo_upstream, upstream_timeout_s=0.3, upstream_query_keys=["s"]) as client:
        response = client.post("/slow?s=2", json={"inputs": CLEAN})
        exposition = client.get("/metrics").text
    assert response.status_code == 504
    assert response.json()["error_type"] == "upstream_timeout"
    assert metric_value(exposition, "guard_upstream_request_duration_seconds_count", outcome="timeout") == 1
