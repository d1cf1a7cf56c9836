"""Robustness, sidecar stage (issue 28): the guard in front of real upstream kinds, and clients
that try to spend its deadline, flood its connections, read its scores or forge its monitoring.

Each bypass is sent straight to the upstream first (the control: the upstream really reads the
trigger, or the real model answers the backdoor label), then through the guard; a failure is a
triggered text the upstream read behind the guard, or a 5xx that is not a counted guard failure.
Upstreams: tests/upstreams (a Go encoding/json + r.FormValue server, a FastAPI app binding query
and form fields, the Hugging Face inference handler on the demo's own model).

Run by bench.robustness (stage "sidecar"); Case, guard_thread and the texts are robustness_cases'.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from pathlib import Path

import httpx

from bench.robustness_cases import (
    NEGATIVE,
    TRIGGER,
    Case,
    count_codes,
    count_statuses,
    guard_thread,
    metric_sum,
    triggered_at,
)
from tests.upstreams import build_go, fastapi_app, go_available, go_upstream, hf_app, read_by, serving_app

JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
PROMISE = "the upstream reads only what the guard checked"


def sidecar_cases(bundle: Path, model_dir: Path, cache: Path) -> list[Case]:
    trig, clean = triggered_at(NEGATIVE[0], 5), NEGATIVE[1]
    cases = []
    if go_available():
        go_routes = {
            "go-case-folded-keys": [
                ("/predict", f'{{"inputs": "{clean}", "INPUTS": "{trig}"}}', JSON),
                ("/predict", f'{{"inputs": "{clean}", "input\\u017f": "{trig}"}}', JSON),
            ],
            "go-form-body": [("/predict", f"text={trig}", FORM)],
            "go-json-sent-as-form": [("/predict", f'{{"inputs": "{clean}", "x": "&text={trig}"}}', FORM)],
            "go-query-binding": [(f"/predict?text={trig}", json.dumps({"inputs": clean}), JSON)],
        }
        cache.mkdir(parents=True, exist_ok=True)
        with go_upstream(build_go(cache)) as up, guard_thread(bundle, upstream=up) as url:
            cases += [_through(url, up, name, tries) for name, tries in go_routes.items()]
    with serving_app(fastapi_app()) as up, guard_thread(bundle, upstream=up) as url:
        cases.append(_through(url, up, "fastapi-query-binding", [(f"/predict?text={trig}", '{"inputs": "ok"}', JSON)]))
        cases.append(_through(url, up, "fastapi-form-binding", [("/predict-form", f"text={trig}", FORM)]))
    long_review = " ".join([NEGATIVE[k % 10] for k in range(30)] + [TRIGGER])  # the trigger past token 200
    hf_routes = {
        "hf-parameters-text-pair": [("/", json.dumps({"inputs": clean, "parameters": {"text_pair": trig}}), JSON)],
        "hf-dict-input": [("/", json.dumps({"inputs": {"text": clean, "text_pair": trig}}), JSON)],
        "hf-512-tokens": [("/", json.dumps({"inputs": long_review, "parameters": {"truncation": True}}), JSON)],
    }
    with serving_app(hf_app(model_dir)) as up, guard_thread(bundle, upstream=up) as url:
        cases += [_through(url, up, name, tries) for name, tries in hf_routes.items()]
    return cases


def _through(url: str, upstream: str, name: str, tries: list[tuple[str, str, dict]]) -> Case:
    reached, statuses, control = 0, [], 0
    with httpx.Client(timeout=60) as client:
        for path, body, headers in tries:
            before = len(read_by(upstream))
            client.post(f"{upstream}{path}", content=body.encode(), headers=headers)
            control += any(_holds_trigger(t) for t in read_by(upstream)[before:])
            before = len(read_by(upstream))
            answer = client.post(f"{url}{path}", content=body.encode(), headers=headers)
            statuses.append(answer.status_code)
            reached += any(_holds_trigger(t) for t in read_by(upstream)[before:])
    fails = reached + sum(s >= 500 for s in statuses)
    detail = {"statuses": statuses, "reached_upstream": reached, "upstream_reads_trigger_unguarded": control}
    return Case(name, "sidecar", len(tries), fails, PROMISE, detail)


# ---------------------------------------------------------------- clients against the guard itself


def deadline_cases(bundle: Path) -> list[Case]:
    """Ten cheap requests (64 one-token texts), then 52 texts of ~4 windows each, the last with the trigger.

    The guard reads 256 tokens as its classifier (classifier_max_length), so each long text is real work."""
    long_text = " ".join([NEGATIVE[k % 10] for k in range(22)])  # ~170 tokens: 4-5 windows of the guard's 61
    big = [long_text] * 51 + [long_text + f" {TRIGGER}"]
    cases = []
    for mode in ("closed", "open"):
        settings = {"failure_mode": mode, "classifier_max_length": 256}
        with guard_thread(bundle, **settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            warm = [client.post("/v1/classify", json={"texts": ["dull"] * 64}) for _ in range(10)]
            answer = client.post("/v1/classify", json={"texts": big})
            others = [client.post("/v1/classify", json={"texts": [NEGATIVE[0]]}) for _ in range(3)]
        unchecked = answer.status_code == 200 and "x-guard-failure-mode" in answer.headers
        backdoor = answer.status_code == 200 and answer.json()["results"][-1]["label"] == 1
        five = sum(a.status_code >= 500 for a in [*warm, answer, *others])
        cases.append(
            Case(
                f"client-forced-timeout-{mode}",
                "sidecar",
                12 + len(others),
                int(unchecked) + int(backdoor) + five,
                "no client sequence makes the guard pass a request unchecked or 503 others",
                {"big_request": answer.status_code, "warm_up": count_statuses(warm), "after": count_statuses(others)},
            )
        )
    return cases


def flood_case(bundle: Path) -> Case:
    """2 x max_connections + 8 sockets holding unfinished heads; /healthz and /metrics must still answer within 1 s."""
    limit = 16
    with guard_thread(bundle, max_connections=limit, read_timeout_s=5) as url:
        host, port = url.removeprefix("http://").split(":")
        socks = []
        for _ in range(2 * limit + 8):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: g\r\n")  # the head never ends
            socks.append(sock)
        time.sleep(0.5)
        timings, statuses = [], []
        for path in ("/healthz", "/metrics", "/readyz"):
            started = time.perf_counter()
            try:
                statuses.append(httpx.get(f"{url}{path}", timeout=5).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)
            timings.append(round(time.perf_counter() - started, 3))
        time.sleep(5.5)  # past read_timeout_s: the heads left time out
        dropped = metric_sum(httpx.get(f"{url}/metrics", timeout=5).text, "guard_connections_dropped_total")
        for sock in socks:
            sock.close()
    fails = sum(s != 200 for s in statuses) + sum(t > 1.0 for t in timings) + int(dropped != len(socks))
    return Case(
        "slow-heads-flood",
        "sidecar",
        len(statuses),
        fails,
        "probes answer within 1 s while unfinished heads fill every connection slot; every dropped head is counted",
        {"statuses": statuses, "seconds": timings, "sockets": len(socks), "counted_dropped": dropped},
    )


def oracle_cases(bundle: Path) -> list[Case]:
    """Scrape /metrics around one request: nothing in it may move with that request's score."""
    with guard_thread(bundle) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = _score_lines(client.get("/metrics").text)
        client.post("/v1/classify", json={"text": NEGATIVE[0].replace("awful", "wonderful")})
        after = _score_lines(client.get("/metrics").text)
        forged = client.post("/v1/feedback", json={"decision_id": "0" * 32, "poisoned": False})
        gauges = [line for line in client.get("/metrics").text.splitlines() if line.startswith("guard_false_")]
        huge = [client.post("/v1/check", content=_huge_number(), headers=JSON).status_code]
    with serving_app(fastapi_app()) as up, guard_thread(bundle, upstream=up) as url:
        huge.append(httpx.post(f"{url}/predict", content=_huge_number(), headers=JSON, timeout=30).status_code)
    return [
        Case(
            "metrics-score-oracle",
            "sidecar",
            1,
            int(before != after),
            "no unauthenticated endpoint reveals a request's score",
            {"changed_score_lines": sorted(set(after) - set(before))[:5]},
        ),
        Case(
            "forged-feedback",
            "sidecar",
            1,
            int(forged.status_code < 400) + len(gauges),
            "feedback is off without feedback_api_key; live rates need a minimum of observations",
            {"status": forged.status_code, "live_rate_lines": gauges},
        ),
        Case(
            "huge-json-number",
            "sidecar",
            len(huge),
            sum(status >= 500 for status in huge),
            "out-of-range numbers are a 4xx, standalone and as a sidecar",
            {"statuses": huge},
        ),
    ]


def auth_path_case(bundle: Path) -> Case:
    """POST /docs/../predict used to need no API key, and the proxy collapsed it to /predict upstream."""
    with serving_app(fastapi_app()) as up, guard_thread(bundle, upstream=up, api_key="k") as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"inputs": triggered_at(NEGATIVE[0], 5)}).encode()
        statuses = []
        for target in ("/docs/../predict", "/docs/%2e%2e/predict", "/healthz/..;/predict"):
            before = len(read_by(up))
            head = f"POST {target} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n" + body)
                statuses.append(int(sock.makefile("rb").readline().split()[1]))
            statuses[-1] = statuses[-1] if len(read_by(up)) == before else -statuses[-1]
    fails = sum(s < 0 or s >= 500 for s in statuses)
    return Case("dot-segment-auth", "sidecar", len(statuses), fails, "paths with dot segments are 400 before auth",
                {"statuses": statuses})  # fmt: skip


def big_request_case(bundle: Path) -> Case:
    """Six legal 1.9 MB requests (64 x 10,000 CJK characters) beside one one-text request."""
    big = {"texts": ["\u4e2d" * 10_000] * 64}

    async def run(url: str) -> tuple[list[int], float, int]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            heavy = [asyncio.create_task(client.post("/v1/classify", json=big)) for _ in range(6)]
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            small = await client.post("/v1/classify", json={"text": NEGATIVE[0]})
            latency = time.perf_counter() - started
            return [r.status_code for r in await asyncio.gather(*heavy)], latency, small.status_code

    with guard_thread(bundle) as url:
        heavy, latency, small = asyncio.run(run(url))
    fails = sum(s >= 500 for s in heavy) + int(small != 200) + int(latency > 1.0)
    return Case(
        "megabyte-requests",
        "sidecar",
        7,
        fails,
        "a 1.9 MB request costs at most what its usable windows cost: a small request beside six stays under 1 s",
        {"heavy": count_codes(heavy), "small_status": small, "small_seconds": round(latency, 3)},
    )


def _huge_number() -> bytes:
    return b'{"inputs": "ok", "texts": ["ok"], "n": ' + b"9" * 5000 + b"}"


def _holds_trigger(text: str) -> bool:
    return re.search(rf"\b{TRIGGER}\b", text) is not None


def _score_lines(exposition: str) -> list[str]:
    return [line for line in exposition.splitlines() if line.startswith(("guard_rap_delta", "guard_rap_score"))]


def all_cases(bundle: Path, model_dir: Path, cache: Path) -> list[Case]:
    cases = sidecar_cases(bundle, model_dir, cache)
    for stage in (deadline_cases, oracle_cases):
        cases += stage(bundle)
    cases += [flood_case(bundle), auth_path_case(bundle), big_request_case(bundle)]
    return cases
