"""Sidecar bodies and query strings read once, strictly, and re-written from what was read.

The upstream must receive exactly what the guard checked. Parsers disagree on bytes
(duplicate keys: first or last wins; Go and .NET bind keys case-insensitively with
Unicode folding; `1e999` is infinity to one and an error to another), so the guard
never forwards the client's bytes: it parses them strictly, refuses what two parsers
could read differently, and forwards its own serialisation of the parsed document.

What is checked: by default every string value at any depth (an upstream may read any
of them: `parameters.text_pair` in the Hugging Face handler, another key of a dict
input), except the values of structural keys (OIP `name`, `datatype`, ...). With a
JSON pointer configured, only the texts there (for an upstream that reads one field).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers

from guard.api.errors import InvalidInput, UnsupportedMediaType
from guard.settings import Settings

INT_LIMIT = 2**63  # integers beyond 64 bits: one parser rounds them, another refuses them
JSON_TYPES = frozenset({"application/json"})


@dataclass(frozen=True)
class Checked:
    """What the guard checks in a request, and what it forwards: bytes built from the same parse."""

    texts: list[str]
    body: bytes
    query: bytes
    content_type: str | None  # None: no body


def read_request(headers: Headers, body: bytes, raw_query: bytes, settings: Settings) -> Checked:
    """The texts to check in a sidecar request, and the body and query to forward built from them."""
    checked_query, query_out = query(raw_query, folded(tuple(settings.upstream_query_keys)))
    if not body and not declares_body(headers):
        return Checked(texts_to_check(checked_query), b"", query_out, None)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"a Content-Encoding ({encoding}) body cannot be checked; send it unencoded")
    kind = media_type(headers.get("content-type"))
    if kind is not None and (kind in JSON_TYPES or kind.endswith("+json")):
        document = parse_json(body, settings.max_json_depth)
        pointer = settings.upstream_text_pointer
        structural = folded(tuple(settings.upstream_structural_keys))
        found = texts_at(document, pointer) if pointer else list(strings(document, structural))
        out, content_type = serialise(document), "application/json"
    elif kind is not None and kind in settings.upstream_text_content_types:
        found, out, content_type = [_utf8(body)], body, headers["content-type"]
    else:
        raise UnsupportedMediaType(
            f"sidecar bodies must be application/json (got {headers.get('content-type') or 'no Content-Type'}); "
            "other types only if listed in upstream_text_content_types"
        )
    texts = texts_to_check(found + checked_query)
    if not texts:
        raise InvalidInput("the request body holds no text to check")
    return Checked(texts, out, query_out, content_type)


def declares_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


@cache
def folded(keys: tuple[str, ...]) -> frozenset[str]:
    """A configured key list, folded once (settings do not change while serving)."""
    return frozenset(fold(k) for k in keys)


def fold(key: str) -> str:
    """A key as case-insensitive binders see it (NFKC, case folded): Kelvin sign and long s included."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", key).casefold())


def parse_json(body: bytes, max_depth: int) -> object:
    """Strict JSON: UTF-8 (no BOM), no duplicate or fold-colliding keys, no NaN/Infinity,
    no number outside what every parser reads alike, no lone surrogate, nesting at most `max_depth`."""
    try:
        document = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constants,
            parse_int=_int,
            parse_float=_float,
        )
    except UnicodeDecodeError:
        raise InvalidInput("sidecar mode needs a UTF-8 JSON request body") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise InvalidInput(f"the request body nests deeper than {max_depth} levels") from None
    if _depth(document) > max_depth:
        raise InvalidInput(f"the request body nests deeper than {max_depth} levels")
    return document


def serialise(document: object) -> bytes:
    """The forwarded body: compact UTF-8 JSON of what was parsed. A lone surrogate is refused:
    parsers replace it, keep it or fail, so the upstream could read another text."""
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("the request body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode") from None


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


def _flat(data: object) -> list[object]:
    """OIP tensor data, flat or nested by shape; anything else is left for the caller to refuse."""
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flat(item)]


def strings(document: object, structural: frozenset[str]) -> Iterator[str]:
    """Every string value at any depth, except the string values of structural keys (compared folded)."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            stack.extend(v for k, v in reversed(node.items()) if not (isinstance(v, str) and fold(k) in structural))


def texts_to_check(candidates: Sequence[str]) -> list[str]:
    """Distinct texts that hold something to read, in order: blank strings carry no trigger."""
    return list(dict.fromkeys(t for t in candidates if t.strip()))


def query(raw: bytes, allowed: frozenset[str]) -> tuple[list[str], bytes]:
    """(values to check, the query to forward re-encoded). Keys must be allow-listed, once each.

    Re-encoding fixes what `;`, `+` and percent-escapes mean for every upstream: what the
    guard decoded is what it sends."""
    if not raw:
        return [], b""
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the query string is not valid (percent-encoded UTF-8 key=value pairs)") from None
    seen: set[str] = set()
    for key, _ in pairs:
        name = fold(key)
        if name not in allowed:
            raise InvalidInput(
                f"query parameter {key!r} is not allowed (upstream_query_keys); an upstream could read text "
                "from it that the guard does not check"
            )
        if name in seen:
            raise InvalidInput(f"query parameter {key!r} is given twice (upstreams disagree on which one counts)")
        seen.add(name)
    return [v for _, v in pairs], urlencode(pairs).encode("ascii")


def media_type(content_type: str | None) -> str | None:
    """The media type, lower case, if the charset (when given) is UTF-8; None when missing or another charset."""
    if not content_type:
        return None
    kind, *params = (p.strip() for p in content_type.split(";"))
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return None
    return kind.lower()


def _utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the request body is not UTF-8 text") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, str] = {}
    for key, _ in pairs:  # a lone surrogate in a key is refused by `serialise`, before any check
        name = fold(key)
        if name in seen:
            first = seen[name]
            what = (
                "duplicate key" if first == key else f"keys {first!r} and {key!r} differ only by case or Unicode form:"
            )
            raise InvalidInput(f"{what} {key!r} in the request body (upstreams disagree on which one counts)")
        seen[name] = key
    return dict(pairs)


def _no_constants(name: str) -> object:
    raise InvalidInput(f"{name} is not JSON")


def _int(text: str) -> int:
    # The digits are counted before int() parses them: Python refuses over 4,300 digits with a ValueError.
    value = int(text) if len(text.lstrip("-")) <= 19 else INT_LIMIT
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise InvalidInput(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range (64-bit integers)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidInput(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range (64-bit floats)")
    return value


def _depth(document: object) -> int:
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest
