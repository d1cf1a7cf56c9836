"""Sidecar mode: check the text in each request body, forward clean requests upstream unchanged.

The guard must read each body as the upstream will: strict JSON (duplicate keys,
non-UTF-8, NaN and deep nesting refused), every BYTES tensor of an OIP body, every
method that carries a body. Requests without a body pass only if allow-listed.
"""

from __future__ import annotations

import json
import re
import time

import httpx
from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers

from guard.api.errors import Forbidden, InvalidInput, UpstreamError, UpstreamTimeout
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
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

router = APIRouter()  # the API key is checked in guard.api.limits, before the body is read


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
    """A string, a list of strings, or Open Inference Protocol tensors: every string of every tensor.

    Not only BYTES tensors: an upstream lenient about `datatype` ("bytes", "STRING") would read
    a text the guard skipped. A BYTES tensor must hold strings only."""
    try:
        node = resolve_pointer(document, pointer)
    except KeyError:
        raise InvalidInput(f"request body has no text at JSON pointer {pointer!r}") from None
    if isinstance(node, list) and node and all(isinstance(t, dict) for t in node):
        data = [(t.get("datatype"), x) for t in node for x in _flat(t.get("data"))]
        if any(kind == "BYTES" and not isinstance(x, str) for kind, x in data):
            raise InvalidInput(f"a BYTES tensor at JSON pointer {pointer!r} holds something other than texts")
        node = [x for _, x in data if isinstance(x, str)]
    if isinstance(node, str):
        return [node]
    if isinstance(node, list) and node and all(isinstance(t, str) for t in node):
        return node
    raise InvalidInput(f"the value at JSON pointer {pointer!r} is not a text or a non-empty list of texts")


def _flat(data: object) -> list[object]:
    """OIP tensor data, flat or nested by shape; anything else is left for the caller to refuse."""
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flat(item)]


def parse_body(body: bytes, max_depth: int) -> object:
    """Strict JSON, so the guard cannot read a body differently from the upstream.

    UTF-8 only (no BOM, no UTF-16), no duplicate keys (parsers disagree on which one
    wins), no NaN or Infinity, nesting at most `max_depth`.
    """
    try:
        text = body.decode("utf-8")
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise InvalidInput("sidecar mode needs a UTF-8 JSON request body") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise InvalidInput(f"the request body nests deeper than {max_depth} levels") from None
    if _depth(document) > max_depth:
        raise InvalidInput(f"the request body nests deeper than {max_depth} levels")
    return document


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidInput(f"duplicate key {key!r} in the request body")
        seen[key] = value
    return seen


def _no_constants(name: str) -> object:
    raise InvalidInput(f"{name} is not JSON")


def _depth(document: object) -> int:
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


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
    guard = {}
    settings = svc.settings
    if body or _declares_body(request.headers):
        texts = texts_at(parse_body(body, settings.max_json_depth), settings.upstream_text_pointer)
        outcome = await svc.check(texts, rid, need_prediction=False)
        guard = enforce(outcome, svc)
    elif not passthrough(request.method, request.url.path, settings.upstream_passthrough):
        raise Forbidden(
            f"{request.method} {request.url.path} without a body is not on the sidecar's pass-through list "
            "(upstream_passthrough); requests with a body are checked"
        )
    status, headers, content = await _forward(request, body, rid)
    response = Response(content, status)
    for key, value in headers:
        response.headers.append(key, value)
    for key, value in guard.items():
        response.headers[key] = value
    return response


def _declares_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


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
            request.method, url, content=body, headers=forward_headers(request.headers, rid, _stripped(svc))
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


def _stripped(svc: GuardService) -> frozenset[str]:
    """The client's Authorization (the guard's own key, typically) stays here unless configured."""
    return frozenset() if svc.settings.upstream_forward_authorization else frozenset({"authorization"})
