"""Robustness, bypass stage: texts and requests built to get a trigger past the guard (the truncation
boundary, sidecar bodies the guard and the upstream could read differently, input the guard cannot
read under failure_mode=open, texts with no token), each beside its control (the unguarded model).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from bench.robustness_cases import (
    FAR_TRIGGER,
    NEGATIVE,
    Case,
    Recorder,
    count_statuses,
    guard_thread,
    triggered_at,
    upstream,
)
from guard.core.backends import load_backend


def bypass_cases(bundle: Path, window: int) -> list[Case]:
    cases = [_truncation_boundary(bundle, window)]
    with upstream() as up, guard_thread(bundle, upstream=up, classifier_max_length=256) as url:
        sidecar = _sidecar_cases(url, window)
    controls = {"beyond-window": [FAR_TRIGGER], "*": [triggered_at(NEGATIVE[0], 5)]}
    for case in sidecar:
        case.detail["unguarded_backdoor_label"] = bare_backdoor_labels(bundle, controls.get(case.case, controls["*"]))
    cases += sidecar
    with upstream() as up, guard_thread(bundle, upstream=up, failure_mode="open") as url:
        cases += _fail_open_cases(url)
    with guard_thread(bundle, failure_mode="open") as url:
        cases.append(
            _expect(
                url,
                "empty-token-texts",
                ["\u200b", "\u200b \u200b", " "],
                422,
                "a text with no token is 422, never checked as empty",
            )
        )
    return cases


def _truncation_boundary(bundle: Path, window: int) -> Case:
    with guard_thread(bundle) as url, httpx.Client(base_url=url, timeout=30) as client:
        texts = [triggered_at(t, p) for t in NEGATIVE for p in range(window - 4, window + 1)]
        answers = [client.post("/v1/classify", json={"text": t}) for t in texts]
    through = sum(a.status_code == 200 and a.json()["results"][0]["label"] == 1 for a in answers)
    return Case(
        "truncation-boundary",
        "bypass",
        len(texts),
        through,
        "a trigger as the last token the model reads is flagged (both passes read the same tokens)",
        {"statuses": count_statuses(answers), "unguarded_backdoor_label": bare_backdoor_labels(bundle, texts)},
    )


def bare_backdoor_labels(bundle: Path, texts: list[str]) -> int:
    """The control: how many of `texts` the unguarded classifier, reading every token, labels positive."""
    from guard.core.bundle import load_bundle

    tokenizer = load_bundle(bundle).tokenizer()
    backend = load_backend("onnx", bundle, 1)
    rows = [[tokenizer.cls_id, *content, tokenizer.sep_id] for content in tokenizer._content(texts, 510)]
    logits = np.concatenate([backend.infer(tokenizer.pad([row])) for row in rows])
    return int((logits.argmax(axis=1) == 1).sum())


def _sidecar_cases(url: str, window: int) -> list[Case]:
    trig, clean = triggered_at(NEGATIVE[0], 5), NEGATIVE[1]
    far = FAR_TRIGGER
    attempts = {
        "beyond-window": [("POST", "/predict", json.dumps({"inputs": far}).encode())],
        "duplicate-keys": [
            ("POST", "/predict", f'{{"inputs": "{trig}", "inputs": "{clean}"}}'.encode()),
            ("POST", "/predict", f'{{"inputs": "{clean}", "inputs": "{trig}"}}'.encode()),
        ],
        "body-on-any-method": [
            (m, "/predict", json.dumps({"inputs": trig}).encode()) for m in ("GET", "DELETE", "OPTIONS", "PATCH", "PUT")
        ],
        "every-bytes-tensor": [
            (
                "POST",
                "/v2/models/m/infer",
                json.dumps(
                    {
                        "inputs": [
                            {"name": "a", "shape": [1], "datatype": "BYTES", "data": [clean]},
                            {"name": "b", "shape": [1], "datatype": "BYTES", "data": [trig]},
                        ]
                    }
                ).encode(),
            )
        ],
        "text-in-query-string": [("GET", f"/predict?inputs={trig}", b""), ("POST", f"/predict?inputs={trig}", b"")],
        "deep-json": [("POST", "/predict", b"[" * 100_000 + b"]" * 100_000)],
    }
    promises = {
        "beyond-window": "text the upstream reads past the guard's window is checked in windows",
        "duplicate-keys": "a body with duplicate keys is 422 (guard and upstream cannot read different texts)",
        "body-on-any-method": "every method that carries a body is checked",
        "every-bytes-tensor": "every BYTES tensor of an OIP body is checked",
        "text-in-query-string": "a request without a body passes only if allow-listed",
        "deep-json": "deeply nested JSON is 422, not a 500",
    }
    return [_reach(url, name, tries, promises[name]) for name, tries in attempts.items()]


def _reach(url: str, name: str, tries: list[tuple[str, str, bytes]], promise: str) -> Case:
    """Send each try through the sidecar; a failure is one that reached the upstream (or a 5xx)."""
    before = len(Recorder.seen)
    statuses = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i, (method, path, body) in enumerate(tries):
            rid = f"{name}-{i}"
            response = client.request(method, path, content=body, headers={"X-Request-ID": rid})
            statuses.append(response.status_code)
    reached = [r for r in Recorder.seen[before:] if r.startswith(name)]
    fails = len(reached) + sum(s >= 500 for s in statuses)
    return Case(name, "bypass", len(tries), fails, promise, {"statuses": statuses, "reached_upstream": len(reached)})


def _fail_open_cases(url: str) -> list[Case]:
    trig = triggered_at(NEGATIVE[0], 5)
    tries = {
        "lone-surrogate-fail-open": [("POST", "/predict", f'{{"inputs": "{trig} \\ud800"}}'.encode())],
        "empty-tensor-fail-open": [
            (
                "POST",
                "/v2/models/m/infer",
                json.dumps({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}).encode(),
            )
        ],
    }
    promise = "input the guard cannot read is the client's 422, never a guard failure let through by failure_mode=open"
    return [_reach(url, name, t, promise) for name, t in tries.items()]


def _expect(url: str, name: str, texts: list[str], status: int, promise: str) -> Case:
    with httpx.Client(base_url=url, timeout=30) as client:
        answers = [client.post("/v1/classify", json={"text": t}) for t in texts]
    return Case(
        name,
        "bypass",
        len(texts),
        sum(a.status_code != status for a in answers),
        promise,
        {"statuses": count_statuses(answers)},
    )
