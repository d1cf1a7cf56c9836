"""Limits enforced before any work: head size, API key, concurrency, body size and read time.

A pure ASGI middleware, so nothing here waits for FastAPI to read or parse a body:
an unauthenticated client cannot make the server buffer a body, a slow one cannot hold
a request slot past `read_timeout_s`, and every refusal is a counted JSON error.
The body, once read within its limits, is handed on to the app unchanged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import unicodedata
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.api.errors import error_response

# The guard's own GET endpoints that need no key: probes, scrapes and the API docs. Exact paths and
# GET only: any other method or path may reach the sidecar's upstream, so it needs the key.
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"}
)
DOCS_ASSETS = "/docs/assets/"  # served from the package, never forwarded
FEEDBACK_PATH = "/v1/feedback"
# Answered at any load: a liveness probe refused with 429 under a flood would restart a busy pod.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


class BodyError(Exception):
    def __init__(self, message: str, error_type: str, status: int) -> None:
        super().__init__(message)
        self.error_type, self.status = error_type, status


class RequestLimits:
    def __init__(self, app: ASGIApp, state) -> None:
        self.app = app
        self.state = state
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await self._refuse(scope, receive, send, *refusal)
        self.active += 1
        try:
            try:
                body = await self._read_body(scope, receive)
            except BodyError as exc:
                return await self._refuse(scope, receive, send, str(exc), exc.error_type, exc.status)
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.active -= 1

    def _refusal(self, scope: Scope) -> tuple[str, str, int, dict[str, str]] | None:
        """Why this request is refused from its head alone, or None."""
        settings = self.state.settings
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > settings.max_header_bytes:
            return (
                f"request head is {head} bytes; the limit is {settings.max_header_bytes}",
                "headers_too_large",
                431,
                {},
            )
        if not _plain_path(scope.get("raw_path") or scope.get("path", "").encode()):
            return (
                "the path has a '.', '..' or empty segment or a backslash (plain or encoded): upstreams "
                "resolve them differently",
                "invalid_path",
                400,
                {},
            )
        if not _authorized(scope, settings):
            return ("missing or wrong API key", "unauthorized", 401, {"WWW-Authenticate": "Bearer"})
        probe = scope["method"] in ("GET", "HEAD") and scope.get("path") in PROBE_PATHS
        if self.active >= settings.max_connections and not probe:
            return (
                f"{self.active} requests in progress; the limit is {settings.max_connections}",
                "too_many_requests",
                429,
                {"Retry-After": "1"},
            )
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return (
                f"request body of {length} bytes; the limit is {settings.max_body_bytes}",
                "payload_too_large",
                413,
                {},
            )
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, within max_body_bytes and read_timeout_s."""
        settings = self.state.settings
        deadline = time.perf_counter() + settings.read_timeout_s
        chunks, size = [], 0
        while True:
            remaining = deadline - time.perf_counter()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except TimeoutError:
                raise BodyError(
                    f"request body not received within {settings.read_timeout_s:g} s", "read_timeout", 408
                ) from None
            if message["type"] == "http.disconnect":
                raise BodyError("client disconnected", "client_disconnected", 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise BodyError(f"request body over {settings.max_body_bytes} bytes", "payload_too_large", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        message: str,
        error_type: str,
        status: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = {**(headers or {}), "Connection": "close"} if status in (408, 413, 431) else headers
        await error_response(self.state, message, error_type, status, headers)(scope, receive, send)


def _plain_path(raw_path: bytes) -> bool:
    """No segment is '.', '..' or empty once percent-decoded (repeatedly), NFKC-normalised and stripped
    of ';' parameters, and no backslash: upstreams (and proxies in front of them) collapse or split
    such paths after the guard has routed and authorised the request by its literal path."""
    path = raw_path.decode("latin-1")
    for _ in range(4):  # %252e -> %2e -> .
        if (decoded := unquote(path)) == path:
            break
        path = decoded
    else:
        return False  # still decoding after 4 rounds: refuse rather than guess
    segments = (unicodedata.normalize("NFKC", s.split(";", 1)[0]) for s in path.split("/"))
    # An empty segment ('//'): some upstreams merge slashes, some redirect, and the forwarding URL
    # cannot start with one; never a model API's path.
    return "\\" not in path and "//" not in path and all(segment not in (".", "..") for segment in segments)


def _authorized(scope: Scope, settings) -> bool:
    path = scope.get("path", "")
    if scope.get("method") == "GET" and (path in OPEN_PATHS or path.startswith(DOCS_ASSETS)):
        return True
    key = settings.feedback_api_key if path == FEEDBACK_PATH and settings.feedback_api_key else settings.api_key
    if key is None:
        return True
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.get_secret_value().encode())


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v for k, v in scope["headers"] if k.lower() == name]
    if not values:
        return None
    if len(values) > 1:  # two Content-Length or Authorization headers: ambiguous, never guess
        return "ambiguous"
    return values[0].decode("latin-1").strip()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then waits for the disconnect."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
