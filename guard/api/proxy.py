"""Sidecar mode: check each request, forward to the upstream exactly what was checked.

guard.api.canonical reads the body and query strictly and re-writes them from what it
parsed; the texts it found are checked, whatever the method; a clean request goes
upstream as that re-written body and query. Requests without a body pass only if
allow-listed (their allow-listed query values are checked all the same).
"""

from __future__ import annotations

import re
import time

import httpx
from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers

from guard.api.canonical import Checked, read_request
from guard.api.errors import Forbidden, UpstreamError, UpstreamTimeout
from guard.api.routes import Svc, enforce
from guard.api.service import GuardService
from guard.logs import request_id_var

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones the client library sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
REWRITTEN = frozenset({"content-type", "content-encoding", "content-md5", "digest", "content-digest"})
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

router = APIRouter()  # the API key is checked in guard.api.limits, before the body is read


def passthrough(method: str, path: str, allowed: list[str]) -> bool:
    """Whether a body-less `METHOD /path` is on the pass-through list ('*' = one path segment)."""
    return any(_matches(method, path, entry) for entry in allowed)


def _matches(method: str, path: str, entry: str) -> bool:
    want_method, _, pattern = entry.partition(" ")
    # '*' is one segment, never '.' or '..': an upstream that resolves them would reach another path
    regex = "/".join(r"(?!\.\.?(?:/|$))[^/]+" if part == "*" else re.escape(part) for part in pattern.split("/"))
    return method == want_method and re.fullmatch(regex, path) is not None


def forward_headers(
    headers: httpx.Headers | Headers, request_id: str | None = None, strip: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """End-to-end headers only, repeated ones (Set-Cookie) kept apart; X-Request-ID set if given."""
    items = headers.multi_items() if isinstance(headers, httpx.Headers) else headers.items()
    connection = ",".join(v for k, v in items if k.lower() == "connection")
    dropped = HOP_BY_HOP | strip | {h.strip().lower() for h in connection.split(",") if h.strip()}
    if request_id:
        dropped |= {"x-request-id"}
    out = [(k, v) for k, v in items if k.lower() not in dropped]
    return out + [("x-request-id", request_id)] if request_id else out


@router.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
async def proxy(path: str, request: Request, svc: Svc) -> Response:
    """Every request with a body is checked, whatever its method; one without is forwarded only if allowed."""
    body = await request.body()
    rid = request_id_var.get()
    settings = svc.settings
    checked = read_request(request.headers, body, request.scope.get("query_string", b""), settings)
    if checked.content_type is None and not passthrough(
        request.method, request.url.path, settings.upstream_passthrough
    ):
        raise Forbidden(
            f"{request.method} {request.url.path} without a body is not on the sidecar's pass-through list "
            "(upstream_passthrough); requests with a body are checked"
        )
    guard = {}
    if checked.texts:
        outcome = await svc.check(checked.texts, rid, need_prediction=False)
        guard = enforce(outcome, svc)
    status, headers, content = await _forward(request, checked, rid)
    response = Response(content, status)
    for key, value in headers:
        response.headers.append(key, value)
    for key, value in guard.items():
        response.headers[key] = value
    return response


async def _forward(request: Request, checked: Checked, rid: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, end-to-end headers and the body exactly as the upstream sent them."""
    client: httpx.AsyncClient = request.app.state.http
    svc: GuardService = request.app.state.service
    # The raw path, not the decoded one: /a%2Fb must not reach the upstream as /a/b.
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    url = httpx.URL(path=raw_path.decode("latin-1"), query=checked.query or None)  # b"" would add a stray "?"
    headers = forward_headers(request.headers, rid, _stripped(svc))
    if checked.content_type is not None:
        headers.append(("content-type", checked.content_type))
    started = time.perf_counter()
    outcome = "error"
    try:
        upstream_request = client.build_request(request.method, url, content=checked.body, headers=headers)
        upstream = await client.send(upstream_request, stream=True)
        try:
            # Raw bytes: the body keeps its Content-Encoding, which is forwarded with it.
            content = b"".join([chunk async for chunk in upstream.aiter_raw()])
        finally:
            await upstream.aclose()
        outcome = str(upstream.status_code)
        return upstream.status_code, forward_headers(upstream.headers), content
    except httpx.TimeoutException:
        outcome = "timeout"
        raise UpstreamTimeout(f"upstream did not answer within {svc.settings.upstream_timeout_s:g} s") from None
    except httpx.TransportError as exc:
        raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
    finally:
        svc.metrics.upstream_duration.labels(outcome).observe(time.perf_counter() - started)


def _stripped(svc: GuardService) -> frozenset[str]:
    """The body is re-written, so its type and encoding headers are the guard's; the client's
    Authorization (the guard's own key, typically) stays here unless configured."""
    auth = frozenset() if svc.settings.upstream_forward_authorization else frozenset({"authorization"})
    return auth | REWRITTEN
