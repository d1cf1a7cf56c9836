"""Sidecar mode: check the text in each request body, forward clean requests upstream unchanged."""

from __future__ import annotations

import json
import time

import httpx
from fastapi import APIRouter, Depends, Request, Response
from starlette.datastructures import Headers

from guard.api.errors import InvalidInput, UpstreamError, UpstreamTimeout
from guard.api.routes import Svc, enforce, require_api_key
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
CHECKED_METHODS = frozenset({"POST", "PUT", "PATCH"})

router = APIRouter(dependencies=[Depends(require_api_key)])


def resolve_pointer(document: object, pointer: str) -> object:
    """RFC 6901 JSON pointer lookup; raises KeyError when the path is absent."""
    node = document
    for raw in pointer.split("/")[1:] if pointer else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise KeyError(pointer)
    return node


def texts_at(document: object, pointer: str) -> list[str]:
    """A string, a list of strings, or Open Inference Protocol tensors (first BYTES tensor's data)."""
    try:
        node = resolve_pointer(document, pointer)
    except KeyError:
        raise InvalidInput(f"request body has no text at JSON pointer {pointer!r}") from None
    if isinstance(node, list) and node and all(isinstance(t, dict) for t in node):
        node = next((t.get("data") for t in node if t.get("datatype") == "BYTES"), None)
    if isinstance(node, str):
        return [node]
    if isinstance(node, list) and node and all(isinstance(t, str) for t in node):
        return node
    raise InvalidInput(f"the value at JSON pointer {pointer!r} is not a text or a list of texts")


def forward_headers(headers: httpx.Headers | Headers, request_id: str | None = None) -> list[tuple[str, str]]:
    """End-to-end headers only, repeated ones (Set-Cookie) kept apart; X-Request-ID set if given."""
    items = headers.multi_items() if isinstance(headers, httpx.Headers) else headers.items()
    connection = ",".join(v for k, v in items if k.lower() == "connection")
    dropped = HOP_BY_HOP | {h.strip().lower() for h in connection.split(",") if h.strip()}
    if request_id:
        dropped |= {"x-request-id"}
    out = [(k, v) for k, v in items if k.lower() not in dropped]
    return out + [("x-request-id", request_id)] if request_id else out


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
)
async def proxy(path: str, request: Request, svc: Svc) -> Response:
    body = await request.body()
    rid = request_id_var.get()
    guard = {}
    if request.method in CHECKED_METHODS:
        texts = texts_at(_json(body), svc.settings.upstream_text_pointer)
        outcome = await svc.check(texts, rid, need_prediction=False)
        guard = enforce(outcome, svc)
    status, headers, content = await _forward(request, body, rid)
    response = Response(content, status)
    for key, value in headers:
        response.headers.append(key, value)
    for key, value in guard.items():
        response.headers[key] = value
    return response


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("sidecar mode needs a JSON request body") from None


async def _forward(request: Request, body: bytes, rid: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, end-to-end headers and the body exactly as the upstream sent them."""
    client: httpx.AsyncClient = request.app.state.http
    svc: GuardService = request.app.state.service
    # The raw path, not the decoded one: /a%2Fb must not reach the upstream as /a/b.
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    url = httpx.URL(path=raw_path.decode("latin-1"), query=query or None)  # b"" would add a stray "?"
    started = time.perf_counter()
    outcome = "error"
    try:
        upstream_request = client.build_request(
            request.method, url, content=body, headers=forward_headers(request.headers, rid)
        )
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
