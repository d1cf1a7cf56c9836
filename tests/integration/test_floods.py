"""Probes survive connection floods (issue 28): real sockets against a real uvicorn guard
started with the production protocol and limits (`uvicorn_thread` applies `connection_limits`).

Before: uvicorn's `limit_concurrency` (2 x max_connections) counted every open socket, those
still sending their head included, and answered 503 to everything above it, /healthz and
/metrics too; nothing was counted. And the app's 429 above max_connections requests in
progress refused the probes as well.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from guard.api import create_app
from guard.api.limits import RequestLimits
from guard.api.service import Capacity
from guard.settings import Settings
from tests.server_fixtures import CLEAN, StubBackend, metric_value, uvicorn_thread

pytestmark = pytest.mark.usefixtures("clean_env")

STUB_CAPACITY = Capacity(seconds_per_row=1e-4, full_request_seconds=0.01)
MAX_CONNECTIONS = 4  # open sockets are bounded at twice this
HEAD_TIMEOUT_S = 2.0
PROBE_BUDGET_S = 1.0  # a liveness probe's usual timeout
PROBES = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


@pytest.fixture()
def stub() -> StubBackend:
    return StubBackend()


@pytest.fixture()
def app(stub_bundle: Path, stub: StubBackend) -> FastAPI:
    settings = Settings(
        bundle=stub_bundle, max_connections=MAX_CONNECTIONS, read_timeout_s=HEAD_TIMEOUT_S, access_log=False
    )
    return create_app(settings, backend=stub, capacity=STUB_CAPACITY)


@pytest.fixture()
def url(app: FastAPI) -> Iterator[str]:
    with uvicorn_thread(app) as base:
        yield base


def _unfinished_head(url: str) -> socket.socket:
    """A connection that sends the start of a request head and never finishes it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"POST /v1/check HTTP/1.1\r\nHost: guard\r\nContent-Type: appl")
    return sock


def _closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """True if the server closed `sock` (EOF or reset) within `wait_s`, with no answer."""
    sock.settimeout(wait_s)
    try:
        data = sock.recv(1024)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    assert data == b"", data  # closed without a response
    return True


def _dropped(client: httpx.Client, reason: str) -> float:
    return metric_value(client.get("/metrics").text, "guard_connections_dropped_total", reason=reason) or 0.0


def test_probes_answer_through_a_flood_of_unfinished_heads(url: str) -> None:
    flood = [_unfinished_head(url) for _ in range(3 * MAX_CONNECTIONS)]  # 12 sockets, the bound is 8
    try:
        with httpx.Client(base_url=url, timeout=PROBE_BUDGET_S) as client:  # one connection for every probe
            started = time.monotonic()
            answers = {path: client.get(path) for path in PROBES}
            elapsed = time.monotonic() - started
            assert {path: r.status_code for path, r in answers.items()} == dict.fromkeys(PROBES, 200)
            assert elapsed < PROBE_BUDGET_S
            # 12 + the probe's connection over a bound of 8: the 5 oldest unfinished heads were shed.
            shed = 3 * MAX_CONNECTIONS + 1 - 2 * MAX_CONNECTIONS
            metrics = answers["/metrics"].text
            assert metric_value(metrics, "guard_connections_dropped_total", reason="shed") == shed
            assert all(_closed_by_server(sock, 1.0) for sock in flood[:shed])
            assert not any(_closed_by_server(sock, 0.01) for sock in flood[shed:])
            # The rest time out on their heads, counted too.
            deadline = time.monotonic() + HEAD_TIMEOUT_S + 10
            while _dropped(client, "head_timeout") < len(flood) - shed and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _dropped(client, "head_timeout") == len(flood) - shed
            assert all(_closed_by_server(sock, 1.0) for sock in flood[shed:])
            assert _dropped(client, "shed") == shed
    finally:
        for sock in flood:
            sock.close()


def test_probes_answer_while_every_request_slot_is_taken(app: FastAPI, url: str, stub: StubBackend) -> None:
    limits = _request_limits(app)
    stub.gate = threading.Event()
    with ThreadPoolExecutor(MAX_CONNECTIONS) as pool, httpx.Client(base_url=url, timeout=PROBE_BUDGET_S) as client:
        request = {"url": f"{url}/v1/classify", "json": {"text": CLEAN}, "timeout": 30}
        held = [pool.submit(httpx.post, **request) for _ in range(MAX_CONNECTIONS)]
        try:
            deadline = time.monotonic() + 10
            while limits.active < MAX_CONNECTIONS and time.monotonic() < deadline:
                time.sleep(0.02)
            refused = client.post("/v1/classify", json={"text": CLEAN})
            probes = {path: client.get(path).status_code for path in PROBES}
        finally:
            stub.gate.set()
        assert refused.status_code == 429 and refused.json()["error_type"] == "too_many_requests"
        assert probes == dict.fromkeys(PROBES, 200)
        assert [f.result().status_code for f in held] == [200] * MAX_CONNECTIONS


def _request_limits(app: FastAPI) -> RequestLimits:
    """The app's RequestLimits middleware (built at startup), to see its requests in progress."""
    layer = app.middleware_stack
    while not isinstance(layer, RequestLimits):
        layer = layer.app
    return layer


def test_a_head_that_does_not_parse_is_counted(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = sock.recv(1024)
    assert answer.startswith(b"HTTP/1.1 400")
    with httpx.Client(base_url=url) as client:
        assert _dropped(client, "invalid_head") == 1
