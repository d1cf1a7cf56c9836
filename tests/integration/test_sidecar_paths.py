"""Auth and paths in sidecar mode (issue 28): the API key guards every path that can reach the
upstream, and a path an upstream could resolve to another one never gets past the guard."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import CLEAN, serving_url

pytestmark = pytest.mark.usefixtures("clean_env")

KEY = "s3cret"
BODY = (f'{{"inputs": "{CLEAN}"}}').encode()


def _seen(upstream: str) -> list[str]:
    return httpx.get(f"{upstream}/__seen").json()


def _send(url: str, method: str, target: str, rid: str, key: bool = False) -> int:
    """One request on a raw socket, its target byte for byte (httpx would resolve dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {KEY}\r\n" if key else ""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nX-Request-ID: {rid}\r\n{auth}Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + BODY)
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "target",
    ["/docs/../predict", "/docs/%2e%2e/predict", "/docs/%252e%252e/predict", "/docs/..;/predict",
     "/healthz/../predict", "/docs/assets/../../predict", "/x/%EF%BC%8E%EF%BC%8E/predict", "/a\\..\\predict",
     "/a%5c..%5cpredict", "//evil.example/predict", "/a//predict", "/a/%2F/predict"],
)  # fmt: skip
def test_dot_segments_are_400_before_auth_and_routing(stub_bundle: Path, echo_upstream: str, target: str) -> None:
    with serving_url(stub_bundle, upstream=echo_upstream, api_key=KEY) as url:
        assert _send(url, "POST", target, f"dots-{target}") == 400
        assert _send(url, "POST", target, f"dots-key-{target}", key=True) == 400
    assert not [r for r in _seen(echo_upstream) if r.startswith("dots-")]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/healthz"), ("PUT", "/metrics"), ("HEAD", "/healthz"), ("POST", "/redoc"), ("POST", "/docs"),
     ("POST", "/docs/assets/x"), ("DELETE", "/openapi.json")],
)  # fmt: skip
def test_open_paths_are_open_for_get_only(stub_bundle: Path, echo_upstream: str, method: str, path: str) -> None:
    rid = f"open-{method}-{path}"
    with serving_url(stub_bundle, upstream=echo_upstream, api_key=KEY) as url:
        assert _send(url, method, path, rid) == 401
        assert _send(url, "GET", "/healthz", "probe") == 200
    assert rid not in _seen(echo_upstream)


def test_a_clean_keyed_request_still_reaches_the_upstream(stub_bundle: Path, echo_upstream: str) -> None:
    with serving_url(stub_bundle, upstream=echo_upstream, api_key=KEY) as url:
        assert _send(url, "POST", "/predict", "keyed-clean", key=True) == 200
    assert "keyed-clean" in _seen(echo_upstream)
