"""The sidecar in front of real upstreams that parse requests their own way (issue 28).

Each attack is first sent straight to the upstream, to show the upstream really reads the
trigger from it, then through the guard: the guard must refuse it, and the upstream must
never read the triggered text. A clean request goes through and is read as sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import CLEAN, TRIGGERED, serving
from tests.upstreams import build_go, fastapi_app, go_available, go_upstream, hf_app, read_by, serving_app

pytestmark = pytest.mark.usefixtures("clean_env")

JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}


def attack(guard: httpx.Client, upstream: str, path: str, body: bytes, headers: dict, refused: int) -> None:
    """The upstream reads the trigger when sent `body` directly; through the guard it is refused unread."""
    before = len(read_by(upstream))
    direct = httpx.post(f"{upstream}{path}", content=body, headers=headers, timeout=30)
    assert any("mb" in t for t in read_by(upstream)[before:]), direct.text  # the attack is real
    before = len(read_by(upstream))
    answer = guard.post(path, content=body, headers=headers)
    assert answer.status_code == refused, answer.text
    assert read_by(upstream)[before:] == []


def clean_passes(guard: httpx.Client, upstream: str, path: str, body: bytes, headers: dict) -> None:
    before = len(read_by(upstream))
    answer = guard.post(path, content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert read_by(upstream)[before:] and all("mb" not in t for t in read_by(upstream)[before:])


# ---------------------------------------------------------------- Go: encoding/json and r.FormValue


@pytest.fixture(scope="module")
def go(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not go_available():  # `make test-deps` installs it; CI runs that
        pytest.skip("go is not installed (make test-deps installs golang-go)")
    with go_upstream(build_go(tmp_path_factory.mktemp("go"))) as url:
        yield url


GO_ATTACKS = {
    "case-folded duplicate key": (f'{{"inputs": "{CLEAN}", "INPUTS": "{TRIGGERED}"}}', JSON, 422),
    "long-s folded key": (f'{{"inputs": "{CLEAN}", "input\\u017f": "{TRIGGERED}"}}', JSON, 422),
    "form body": (f"text={TRIGGERED}", FORM, 415),
    "json body sent as a form": (f'{{"inputs": "{CLEAN}", "x": "&text={TRIGGERED}"}}', FORM, 415),
}


@pytest.mark.parametrize("name", GO_ATTACKS)
def test_go_upstream_reads_no_unchecked_text(stub_bundle: Path, go: str, name: str) -> None:
    body, headers, refused = GO_ATTACKS[name]
    with serving(stub_bundle, upstream=go) as guard:
        attack(guard, go, "/predict", body.encode(), headers, refused)
        clean_passes(guard, go, "/predict", json.dumps({"inputs": CLEAN}).encode(), JSON)


def test_go_upstream_query_binding(stub_bundle: Path, go: str) -> None:
    body = json.dumps({"inputs": CLEAN}).encode()
    with serving(stub_bundle, upstream=go) as guard:
        attack(guard, go, f"/predict?text={TRIGGERED}", body, JSON, 422)


# ---------------------------------------------------------------- FastAPI: query and form binding


@pytest.fixture(scope="module")
def fastapi_upstream() -> Iterator[str]:
    with serving_app(fastapi_app()) as url:
        yield url


def test_fastapi_query_parameter_is_refused_unless_allowed_then_checked(
    stub_bundle: Path, fastapi_upstream: str
) -> None:
    body = json.dumps({"inputs": CLEAN}).encode()
    with serving(stub_bundle, upstream=fastapi_upstream) as guard:
        attack(guard, fastapi_upstream, f"/predict?text={TRIGGERED}", body, JSON, 422)
    with serving(stub_bundle, upstream=fastapi_upstream, upstream_query_keys=["text"]) as guard:
        attack(guard, fastapi_upstream, f"/predict?text={TRIGGERED}", body, JSON, 403)
        clean_passes(guard, fastapi_upstream, f"/predict?text={CLEAN}", body, JSON)


def test_fastapi_form_field_is_415(stub_bundle: Path, fastapi_upstream: str) -> None:
    with serving(stub_bundle, upstream=fastapi_upstream) as guard:
        attack(guard, fastapi_upstream, "/predict-form", f"text={TRIGGERED}".encode(), FORM, 415)


# ---------------------------------------------------------------- the Hugging Face inference handler


@pytest.fixture(scope="module")
def hf_upstream(tiny_model_dir: Path) -> Iterator[str]:
    with serving_app(hf_app(tiny_model_dir)) as url:
        yield url


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": CLEAN, "parameters": {"text_pair": TRIGGERED}},  # tokenizer kwargs from parameters
        {"inputs": {"text": CLEAN, "text_pair": TRIGGERED}},  # a dict input
    ],
    ids=["parameters.text_pair", "dict-input"],
)
def test_hf_handler_pairs_are_checked(stub_bundle: Path, hf_upstream: str, body: dict) -> None:
    with serving(stub_bundle, upstream=hf_upstream) as guard:
        attack(guard, hf_upstream, "/", json.dumps(body).encode(), JSON, 403)
        clean_passes(guard, hf_upstream, "/", json.dumps({"inputs": CLEAN, "parameters": {"top_k": 1}}).encode(), JSON)


def test_hf_handler_reads_past_the_guards_window_and_so_does_the_guard(stub_bundle: Path, hf_upstream: str) -> None:
    """No classifier_max_length set: the sidecar checks the whole text, as the pipeline (128 tokens) reads it."""
    text = " ".join([*["movie"] * 80, "good", "mb"])  # past the guard's 29-token window (the stub needs "good" near)
    body = json.dumps({"inputs": text, "parameters": {"truncation": True}}).encode()
    with serving(stub_bundle, upstream=hf_upstream) as guard:
        attack(guard, hf_upstream, "/", body, JSON, 403)


KEY_VARIANTS = ["INPUTS", "Inputs", "input\u017f", "\u0130nputs", "\u0131nputs", "\u212anputs", "\uff49nputs",
                "inputs\u200b", "i\u0307nputs"]  # fmt: skip


@pytest.mark.parametrize("key", KEY_VARIANTS)
def test_every_key_go_binds_as_inputs_collides_for_the_guard(stub_bundle: Path, go: str, key: str) -> None:
    """Whatever Go's encoding/json folds onto `inputs`, the guard refuses as a colliding key (with a pointer
    set, the one mode in which a second spelling of the key would not be checked anyway)."""
    body = json.dumps({"inputs": CLEAN, key: TRIGGERED}, ensure_ascii=False).encode()
    before = len(read_by(go))
    httpx.post(f"{go}/predict", content=body, headers=JSON, timeout=30)
    go_binds_it = any("mb" in t for t in read_by(go)[before:])
    with serving(stub_bundle, upstream=go, upstream_text_pointer="/inputs") as guard:
        answer = guard.post("/predict", content=body, headers=JSON)
    if go_binds_it:
        assert answer.status_code == 422, answer.text
