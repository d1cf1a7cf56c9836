"""guard.api.canonical: what a sidecar request is read as, and what is forwarded in its place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from guard.api.canonical import fold, parse_json, query, read_request, serialise, strings
from guard.api.errors import InvalidInput, UnsupportedMediaType
from guard.settings import DEFAULT_STRUCTURAL_KEYS, Settings

STRUCTURAL = frozenset(DEFAULT_STRUCTURAL_KEYS)
JSON = Headers({"content-type": "application/json", "content-length": "1"})


@pytest.fixture()
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("GUARD_UPSTREAM_TEXT_POINTER", "GUARD_UPSTREAM_QUERY_KEYS"):
        monkeypatch.delenv(name, raising=False)
    return Settings(bundle=tmp_path, upstream="http://upstream.invalid")


@pytest.mark.parametrize(
    "body",
    [
        '{"inputs": "a", "INPUTS": "b"}',  # Go's encoding/json: case-insensitive, last match wins
        '{"inputs": "a", "\\u0130nputs": "b"}',  # dotted capital I folds to i + combining dot: not equal
        '{"kind": "a", "\\u212aind": "b"}',  # Kelvin sign folds to k (Go's EqualFold, .NET)
        '{"class": "a", "cla\\u017f\\u017f": "b"}',  # long s folds to s
        '{"text": "a", "ｔｅｘｔ": "b"}',  # full-width letters are the same key under NFKC
        '{"inputs": "a", "inputs": "b"}',
    ],
)
def test_keys_that_fold_together_are_refused(body: str) -> None:
    if "\\u0130" in body:  # İ casefolds to i̇ (two code points): a different key for Go and for us
        assert parse_json(body.encode(), 8)
        return
    with pytest.raises(InvalidInput, match="duplicate key|differ only by case"):
        parse_json(body.encode(), 8)


def test_fold_matches_case_insensitive_binders() -> None:
    assert fold("INPUTS") == fold("inputs") == fold("Inputs")
    assert fold("\u212aey") == fold("key")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"a": ' + "9" * 5000 + "}", "out of range"),  # int() refuses past 4,300 digits: used to be a 500
        ('{"a": 9223372036854775808}', "out of range"),
        ('{"a": 1e999}', "out of range"),
        ('{"a": -1e999}', "out of range"),
        ('{"a": NaN}', "not JSON"),
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('{"\\udc00": "a"}', "lone surrogate"),
    ],
)
def test_numbers_and_text_parsers_read_differently_are_refused(body: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        serialise(parse_json(body.encode(), 8))


def test_the_forwarded_body_is_what_was_parsed() -> None:
    document = parse_json(b'{ "inputs" : ["a\\u00e9", 1.50, -0, 9223372036854775807], "p": {"x": null} }', 8)
    assert serialise(document) == '{"inputs":["aé",1.5,0,9223372036854775807],"p":{"x":null}}'.encode()


def test_every_string_is_checked_but_structural_values() -> None:
    body = {
        "id": "req-1",
        "inputs": [{"name": "t", "datatype": "BYTES", "shape": [2], "data": ["one", "two"]}],
        "parameters": {"text_pair": "pair", "Name": "skipped", "nested": [{"deep": "three"}]},
        "name": {"not": "structure when it holds an object"},
    }
    assert sorted(strings(body, STRUCTURAL)) == ["one", "pair", "structure when it holds an object", "three", "two"]


def test_query_keys_must_be_allow_listed_and_are_re_encoded() -> None:
    assert query(b"", frozenset()) == ([], b"")
    with pytest.raises(InvalidInput, match="not allowed"):
        query(b"text=hello", frozenset())
    with pytest.raises(InvalidInput, match="given twice"):
        query(b"text=a&TEXT=b", frozenset({"text"}))
    texts, forwarded = query(b"text=a+b%3Bc;d=e", frozenset({"text"}))
    assert texts == ["a b;c;d=e"]
    assert forwarded == b"text=a+b%3Bc%3Bd%3De"  # one reading for every upstream: ';' is no separator
    with pytest.raises(InvalidInput, match="not valid"):
        query(b"text=%ff", frozenset({"text"}))


def test_a_request_is_read_whole(settings: Settings) -> None:
    body = json.dumps({"inputs": {"text": "a", "text_pair": "b"}, "parameters": {"top_k": 2}}).encode()
    checked = read_request(JSON, body, b"", settings)
    assert checked.texts == ["a", "b"]
    assert json.loads(checked.body) == json.loads(body)
    assert checked.content_type == "application/json"


def test_a_pointer_limits_the_check_to_that_field(settings: Settings) -> None:
    narrowed = settings.model_copy(update={"upstream_text_pointer": "/inputs"})
    checked = read_request(JSON, b'{"inputs": "a", "other": "b"}', b"", narrowed)
    assert checked.texts == ["a"]


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "multipart/form-data; boundary=x"},
        {"content-type": "text/plain"},
        {},
        {"content-type": "application/json; charset=latin-1"},
        {"content-type": "application/json", "content-encoding": "gzip"},
    ],
)
def test_bodies_the_guard_cannot_read_as_json_are_415(settings: Settings, headers: dict) -> None:
    with pytest.raises(UnsupportedMediaType):
        read_request(Headers({**headers, "content-length": "9"}), b'{"a":"b"}', b"", settings)


def test_configured_text_types_are_checked_whole(settings: Settings) -> None:
    plain = settings.model_copy(update={"upstream_text_content_types": ["text/plain"]})
    checked = read_request(Headers({"content-type": "text/plain; charset=utf-8"}), b"hello mb", b"", plain)
    assert (checked.texts, checked.body) == (["hello mb"], b"hello mb")


def test_form_types_cannot_be_configured_as_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read as one text"):
        Settings(bundle=tmp_path, upstream_text_content_types=["application/x-www-form-urlencoded"])


def test_blank_strings_are_not_texts_but_a_body_needs_one(settings: Settings) -> None:
    assert read_request(JSON, b'{"inputs": "a", "prefix": " ", "p": ""}', b"", settings).texts == ["a"]
    with pytest.raises(InvalidInput, match="no text to check"):
        read_request(JSON, b'{"inputs": [1, 2]}', b"", settings)
