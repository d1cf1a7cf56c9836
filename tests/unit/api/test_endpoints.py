"""Every endpoint and every error of the app, in-process (ASGI) with a stub backend.

The stub (tests/server_fixtures.py) predicts "positive" for texts with "good" and
lets the RAP token pull p(positive) from e^2/(1+e^2) down to 1/2, except when the
trigger "mb" is present: "good movie" passes, "good mb movie" is flagged,
"bad movie" is negative and never checked.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from prometheus_client import CollectorRegistry

from guard.api import create_app
from guard.api.service import Capacity
from guard.metrics import GuardMetrics
from tests.server_fixtures import (
    CLEAN,
    CLEAN_SCORE,
    NEGATIVE,
    P_CONFIDENT,
    TRIGGERED,
    StubBackend,
    asgi_client,
    metric_value,
)

pytestmark = pytest.mark.anyio

# The metric names ARCHITECTURE.md promises dashboards.
ARCHITECTURE_METRICS = {
    "guard_requests_total",
    "guard_request_duration_seconds",
    "guard_inference_duration_seconds",
    "guard_queue_duration_seconds",
    "guard_batch_size",
    "guard_pending_requests",
    "guard_rap_score",
    "guard_calibrated_frr",
    "guard_calibrated_far",
    "guard_false_accept_ratio",
    "guard_false_reject_ratio",
    "guard_failure_mode_allowed_total",
    "guard_upstream_request_duration_seconds",
    "guard_model_info",
    "guard_rejections_total",
    "guard_http_responses_total",
    "guard_batcher_restarts",
    "guard_detectors",
    "guard_batch_tokens_total",
    "guard_flags_total",
    "guard_connections_dropped_total",
}
# Served on metrics_port only: per-request observations would give a client its request's score.
SCORE_METRICS = {"guard_rap_score"}
# Feedback is on only with a key of its own; one answer counts towards the live rates here.
FEEDBACK_ON = {"feedback_api_key": "labeller", "live_rates_min_observations": 1}
LABELLER = {"Authorization": "Bearer labeller"}
# What `guard serve` measures before it starts; given here so the stub's row counts stay exact.
STUB_CAPACITY = Capacity(seconds_per_row=1e-4, full_request_seconds=0.01)


def _app(make_settings, stub: StubBackend, **overrides):
    return create_app(make_settings(**overrides), backend=stub, capacity=STUB_CAPACITY)


async def _metrics(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def _assert_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    assert body["error"] and body["request_id"] == response.headers["x-request-id"]
    return body


# ---------------------------------------------------------------- /v1/check


async def test_check_one_text(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, expose_scores=True)) as client:
        response = await client.post("/v1/check", json={"text": CLEAN}, headers={"X-Request-ID": "req-1"})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == "req-1"
    (item,) = body["results"]
    assert item["label"] == 1 and item["label_name"] == "positive" and item["flagged"] is False
    assert item["probs"] == pytest.approx([1 - P_CONFIDENT, P_CONFIDENT])
    assert item["rap"] == {"checked": True, "score": pytest.approx(CLEAN_SCORE), "threshold": -0.1}
    assert item["request_id"] == "req-1"


async def test_check_several_texts(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, expose_scores=True)) as client:
        response = await client.post("/v1/check", json={"texts": [CLEAN, TRIGGERED, NEGATIVE]})
    assert response.status_code == 200  # the decision API answers 200 even when something is flagged
    results = response.json()["results"]
    assert [r["flagged"] for r in results] == [False, True, False]
    assert [r["label"] for r in results] == [1, 1, 0]
    assert [r["rap"]["checked"] for r in results] == [True, True, False]
    assert results[1]["rap"]["score"] == pytest.approx(0.0)
    assert results[2]["rap"] == {"checked": False, "score": None, "threshold": None}


async def test_bare_mode_answers_unchecked_and_says_so(make_settings, stub: StubBackend, caplog) -> None:
    with caplog.at_level("WARNING", logger="guard.api.service"):
        async with asgi_client(_app(make_settings, stub, detectors=["none"], expose_scores=True)) as client:
            check = await client.post("/v1/check", json={"texts": [CLEAN, TRIGGERED]})
            classify = await client.post("/v1/classify", json={"text": TRIGGERED})
            metrics = (await client.get("/metrics")).text
    assert check.status_code == 200 and check.headers["X-Guard-Detectors"] == "none"
    results = check.json()["results"]
    assert [r["label"] for r in results] == [1, 1]
    assert all(not r["flagged"] and r["rap"] == {"checked": False, "score": None, "threshold": None} for r in results)
    assert classify.status_code == 200  # the trigger passes: nothing checks it
    assert classify.headers["X-Guard-Detectors"] == "none"
    assert stub.pass2_rows == 0
    assert metric_value(metrics, "guard_detectors", detectors="none") == 1
    assert any("BARE MODE" in r.getMessage() for r in caplog.records)


async def test_guarded_responses_carry_no_detectors_header(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.post("/v1/check", json={"text": CLEAN})
    assert "X-Guard-Detectors" not in response.headers


@pytest.mark.parametrize(
    "body",
    [{"text": "a", "texts": ["b"]}, {}, {"texts": []}, {"text": "   "}, {"texts": ["ok", ""]}, {"text": 3}, []],
    ids=["both", "neither", "empty-list", "blank-text", "empty-item", "not-a-string", "not-an-object"],
)
async def test_check_rejects_invalid_bodies(make_settings, stub: StubBackend, body) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.post("/v1/check", json=body)
    _assert_error(response, 422, "invalid_input")


async def test_check_rejects_malformed_json(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.post("/v1/check", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(response, 422, "invalid_input")


async def test_check_limits(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, max_texts_per_request=3, max_text_chars=20)) as client:
        too_many = await client.post("/v1/check", json={"texts": ["good"] * 4})
        too_long = await client.post("/v1/check", json={"text": "x" * 21})
        at_limits = await client.post("/v1/check", json={"texts": ["x" * 20] * 3})
    assert "limit is 3" in _assert_error(too_many, 413, "payload_too_large")["error"]
    assert "limit is 20" in _assert_error(too_long, 413, "payload_too_large")["error"]
    assert at_limits.status_code == 200
    assert stub.pass1_rows == 1 + 3  # warm-up + the accepted request: rejected ones never reach the backend


# ---------------------------------------------------------------- /v1/classify


async def test_classify_clean(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.post("/v1/classify", json={"texts": [CLEAN, NEGATIVE]})
    assert response.status_code == 200
    assert "x-guard-flagged" not in response.headers
    results = response.json()["results"]
    assert [(r["label"], r["label_name"]) for r in results] == [(1, "positive"), (0, "negative")]
    assert results[1]["probs"] == pytest.approx([P_CONFIDENT, 1 - P_CONFIDENT])


async def test_classify_flagged_is_rejected_in_enforce_mode(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.post("/v1/classify", json={"texts": [CLEAN, TRIGGERED]}, headers={"X-Request-ID": "r9"})
        exposition = await _metrics(client)
    body = _assert_error(response, 403, "guard_rejected")
    assert body["request_id"] == "r9"
    assert "server-timing" in response.headers
    assert metric_value(exposition, "guard_requests_total", decision="block", mode="enforce") == 1


async def test_classify_flagged_passes_with_a_header_in_shadow_mode(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, mode="shadow")) as client:
        flagged = await client.post("/v1/classify", json={"text": TRIGGERED})
        clean = await client.post("/v1/classify", json={"text": CLEAN})
        exposition = await _metrics(client)
    assert flagged.status_code == 200
    assert flagged.headers["x-guard-flagged"] == "true"
    assert flagged.json()["results"][0]["label"] == 1
    assert clean.status_code == 200 and "x-guard-flagged" not in clean.headers
    assert metric_value(exposition, "guard_requests_total", decision="block", mode="shadow") == 1
    assert metric_value(exposition, "guard_requests_total", decision="allow", mode="shadow") == 1


# ---------------------------------------------------------------- Open Inference Protocol


def _oip(*texts: str, datatype: str = "BYTES") -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": datatype, "data": list(texts)}]}


async def test_oip_infer(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.post("/v2/models/guard/infer", json=_oip(CLEAN, NEGATIVE) | {"id": "oip-1"})
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "guard" and body["id"] == "oip-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"] == {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]}
    assert outputs["flagged"]["data"] == [False, False] and outputs["flagged"]["datatype"] == "BOOL"
    assert outputs["probs"]["shape"] == [2, 2] and outputs["probs"]["datatype"] == "FP32"
    assert outputs["probs"]["data"] == pytest.approx([1 - P_CONFIDENT, P_CONFIDENT, P_CONFIDENT, 1 - P_CONFIDENT])


async def test_oip_errors(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        unknown = await client.post("/v2/models/other/infer", json=_oip(CLEAN))
        no_bytes = await client.post("/v2/models/guard/infer", json=_oip(CLEAN, datatype="FP32"))
        not_strings = await client.post(
            "/v2/models/guard/infer", json=_oip(CLEAN) | {"inputs": [_oip()["inputs"][0] | {"data": [1]}]}
        )
        no_inputs = await client.post("/v2/models/guard/infer", json={"inputs": []})
        flagged = await client.post("/v2/models/guard/infer", json=_oip(CLEAN, TRIGGERED))
    _assert_error(unknown, 404, "not_found")
    _assert_error(no_bytes, 422, "invalid_input")
    _assert_error(not_strings, 422, "invalid_input")
    _assert_error(no_inputs, 422, "invalid_input")
    _assert_error(flagged, 403, "guard_rejected")


async def test_oip_model_metadata_and_readiness(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, model_name="sentiment")) as client:
        metadata = await client.get("/v2/models/sentiment")
        ready = await client.get("/v2/models/sentiment/ready")
        unknown = await client.get("/v2/models/guard/ready")
    assert metadata.status_code == 200
    assert metadata.json()["name"] == "sentiment"
    assert metadata.json()["platform"] == "backdoor-guard/stub"
    assert {o["name"] for o in metadata.json()["outputs"]} == {"label", "probs", "flagged"}
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    _assert_error(unknown, 404, "not_found")


# ---------------------------------------------------------------- /v1/feedback


async def test_feedback_is_off_without_its_own_key(make_settings, stub: StubBackend) -> None:
    """Any client could forge ground truth: one POST used to set the live FRR to 1.0."""
    async with asgi_client(_app(make_settings, stub)) as client:
        decision = (await client.post("/v1/check", json={"text": CLEAN})).json()["decision_id"]
        forged = await client.post("/v1/feedback", json={"decision_id": decision, "poisoned": False})
        exposition = await _metrics(client)
    body = _assert_error(forged, 404, "not_found")
    assert "feedback_api_key" in body["error"]
    assert metric_value(exposition, "guard_false_reject_ratio", source="feedback") is None


async def test_feedback_scores_earlier_decisions(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, **FEEDBACK_ON), headers=LABELLER) as client:
        allowed = (await client.post("/v1/check", json={"text": CLEAN})).json()["decision_id"]
        flagged = (await client.post("/v1/classify", json={"text": TRIGGERED})).headers["x-guard-decision-id"]
        missed = await client.post("/v1/feedback", json={"decision_id": allowed, "poisoned": True})
        wrongly_flagged = await client.post("/v1/feedback", json={"decision_id": flagged, "poisoned": False})
        again = await client.post("/v1/feedback", json={"decision_id": allowed, "poisoned": True})
        unknown = await client.post("/v1/feedback", json={"decision_id": "never-seen", "poisoned": False})
        invalid = await client.post("/v1/feedback", json={"decision_id": "", "poisoned": False})
        exposition = await _metrics(client)
    assert missed.json() == {"recorded": True, "outcome": "false_accept"}
    assert wrongly_flagged.json() == {"recorded": True, "outcome": "false_reject"}
    _assert_error(again, 404, "not_found")  # feedback counts once per decision
    _assert_error(unknown, 404, "not_found")
    _assert_error(invalid, 422, "invalid_input")
    assert metric_value(exposition, "guard_false_accept_ratio", source="feedback") == 1.0
    assert metric_value(exposition, "guard_false_reject_ratio", source="feedback") == 1.0


async def test_feedback_takes_the_oip_decision_id(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, **FEEDBACK_ON), headers=LABELLER) as client:
        infer = await client.post("/v2/models/guard/infer", json=_oip(CLEAN) | {"id": "oip-7"})
        by_client_id = await client.post("/v1/feedback", json={"decision_id": "oip-7", "poisoned": False})
        decision = infer.json()["parameters"]["decision_id"]
        feedback = await client.post("/v1/feedback", json={"decision_id": decision, "poisoned": False})
    _assert_error(by_client_id, 404, "not_found")  # the client's own id is never a decision id
    assert feedback.status_code == 200 and feedback.json()["outcome"] == "true_accept"


async def test_a_reused_request_id_cannot_overwrite_an_earlier_decision(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, **FEEDBACK_ON), headers=LABELLER) as client:
        first = await client.post("/v1/check", json={"text": TRIGGERED}, headers={"X-Request-ID": "same"})
        second = await client.post("/v1/check", json={"text": CLEAN}, headers={"X-Request-ID": "same"})
        by_request_id = await client.post("/v1/feedback", json={"decision_id": "same", "poisoned": True})
        outcome = await client.post("/v1/feedback", json={"decision_id": first.json()["decision_id"], "poisoned": True})
    assert first.json()["decision_id"] != second.json()["decision_id"]
    _assert_error(by_request_id, 404, "not_found")
    assert outcome.json()["outcome"] == "true_reject"  # still the first request's decision: flagged


async def test_feedback_true_outcomes_lower_the_live_rates(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, **FEEDBACK_ON), headers=LABELLER) as client:
        ids = [
            (await client.post("/v1/check", json={"text": text})).json()["decision_id"]
            for text in (CLEAN, TRIGGERED, TRIGGERED)
        ]
        outcomes = [
            (await client.post("/v1/feedback", json={"decision_id": d, "poisoned": poisoned})).json()["outcome"]
            for d, poisoned in zip(ids, (False, True, False), strict=True)
        ]
        exposition = await _metrics(client)
    assert outcomes == ["true_accept", "true_reject", "false_reject"]
    assert metric_value(exposition, "guard_false_accept_ratio", source="feedback") == 0.0
    assert metric_value(exposition, "guard_false_reject_ratio", source="feedback") == 0.5


# ---------------------------------------------------------------- health, metrics, OpenAPI


async def test_health_endpoints(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        answers = {
            path: await client.get(path) for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
        }
    assert {path: r.status_code for path, r in answers.items()} == dict.fromkeys(answers, 200)
    assert answers["/healthz"].json() == {"status": "alive"}
    assert answers["/readyz"].json() == {"status": "ready"}


async def test_not_ready_before_the_lifespan_ran(make_settings, stub: StubBackend) -> None:
    app = _app(make_settings, stub)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://guard") as client:
        live = await client.get("/healthz")
        ready = await client.get("/readyz")
        oip_ready = await client.get("/v2/health/ready")
        check = await client.post("/v1/check", json={"text": CLEAN})
    assert live.status_code == 200
    _assert_error(ready, 503, "not_ready")
    _assert_error(oip_ready, 503, "not_ready")
    _assert_error(check, 503, "not_ready")
    assert stub.calls == []


async def test_metrics_lists_every_declared_metric(make_settings, stub: StubBackend) -> None:
    families = list(GuardMetrics(CollectorRegistry(), "stub").scrape_registry.collect())
    declared = {f.name for f in families}
    app = _app(make_settings, stub)
    async with asgi_client(app) as client:
        await client.post("/v1/check", json={"texts": [CLEAN, TRIGGERED]})
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    exposed = {line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE ")}
    on_port = {name for name in declared if any(e == name or e.startswith(name + "_") for e in exposed)}
    assert on_port == declared - SCORE_METRICS
    assert {f.name + "_total" if f.type == "counter" else f.name for f in families} == ARCHITECTURE_METRICS
    scores = app.state.metrics.scrape_registry  # what metrics_port serves
    assert scores.get_sample_value("guard_rap_score_count", {"label": "positive"}) == 2
    text = response.text
    assert metric_value(text, "guard_requests_total", decision="block", mode="enforce") == 1
    assert metric_value(text, "guard_calibrated_frr", label="positive") == 0.01
    assert metric_value(text, "guard_calibrated_far", attack="badnet-rw") == 0.0
    assert metric_value(text, "guard_model_info", model="guard") == 1
    assert metric_value(text, "guard_inference_duration_seconds_count", **{"pass": "1", "backend": "stub"}) >= 2
    assert metric_value(text, "guard_request_duration_seconds_count", endpoint="/v1/check") == 1
    assert metric_value(text, "guard_detectors", detectors="rap") == 1
    assert metric_value(text, "guard_batch_tokens_total", kind="real") > 0
    assert metric_value(text, "guard_batch_tokens_total", kind="padding") >= 0


async def test_openapi_schema(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/v1/check", "/v1/classify", "/v1/feedback", "/v2/models/{name}/infer", "/healthz", "/readyz"):
        assert path in paths


# ---------------------------------------------------------------- request id, timing, API key


async def test_request_id_is_echoed_or_made(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        given = await client.post("/v1/check", json={"text": CLEAN}, headers={"X-Request-ID": "abc-123"})
        made = await client.post("/v1/check", json={"text": CLEAN})
        health = await client.get("/healthz", headers={"X-Request-ID": "probe"})
    assert given.headers["x-request-id"] == "abc-123" == given.json()["request_id"]
    assert len(made.headers["x-request-id"]) == 32 and made.json()["request_id"] == made.headers["x-request-id"]
    assert health.headers["x-request-id"] == "probe"


async def test_server_timing(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        check = await client.post("/v1/check", json={"text": CLEAN})
        health = await client.get("/healthz")
    parts = [p.split(";")[0] for p in check.headers["server-timing"].split(", ")]
    assert parts == ["queue", "compute", "total"]
    assert health.headers["server-timing"].startswith("total;dur=")


async def test_api_key(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, api_key="s3cret")) as client:
        missing = await client.post("/v1/check", json={"text": CLEAN})
        wrong = await client.post("/v1/check", json={"text": CLEAN}, headers={"Authorization": "Bearer nope"})
        basic = await client.post("/v1/classify", json={"text": CLEAN}, headers={"Authorization": "Basic s3cret"})
        oip = await client.post("/v2/models/guard/infer", json=_oip(CLEAN))
        right = await client.post("/v1/check", json={"text": CLEAN}, headers={"Authorization": "Bearer s3cret"})
        open_paths = [await client.get(p) for p in ("/healthz", "/readyz", "/metrics", "/v2/health/ready")]
    for response in (missing, wrong, basic, oip):
        _assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200
    assert [r.status_code for r in open_paths] == [200] * 4
    assert stub.pass1_rows == 1 + 1  # warm-up + the authorised request


# ---------------------------------------------------------------- failure modes


async def test_fail_closed_on_backend_error(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub)) as client:
        stub.fail = RuntimeError("onnxruntime exploded")
        response = await client.post("/v1/check", json={"text": CLEAN})
        classify = await client.post("/v1/classify", json={"text": NEGATIVE})
        exposition = await _metrics(client)
    body = _assert_error(response, 503, "guard_unavailable")
    assert "backend" in body["error"] and "exploded" not in body["error"]  # no internals in the answer
    _assert_error(classify, 503, "guard_unavailable")
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") == 2
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="backend") is None


async def test_fail_open_lets_pass1_predictions_through(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, failure_mode="open")) as client:
        stub.fail_pass2 = RuntimeError("pass 2 broke")
        response = await client.post("/v1/check", json={"texts": [TRIGGERED, NEGATIVE]})
        classify = await client.post("/v1/classify", json={"text": TRIGGERED})
        exposition = await _metrics(client)
    assert response.status_code == 200
    assert response.headers["x-guard-failure-mode"] == "open; unchecked (backend)"
    results = response.json()["results"]
    assert [r["label"] for r in results] == [1, 0]
    assert [r["flagged"] for r in results] == [False, False]
    assert [r["rap"]["checked"] for r in results] == [False, False]
    assert classify.status_code == 200 and "x-guard-failure-mode" in classify.headers
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="backend") == 2
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") == 2


async def test_fail_open_without_any_prediction_is_still_503(make_settings, stub: StubBackend) -> None:
    """Standalone endpoints have nothing to answer when pass 1 failed; that is not 'let through'."""
    async with asgi_client(_app(make_settings, stub, failure_mode="open")) as client:
        stub.fail = RuntimeError("down")
        response = await client.post("/v1/classify", json={"text": CLEAN})
        exposition = await _metrics(client)
    _assert_error(response, 503, "guard_unavailable")
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") == 1
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="backend") is None


async def test_timeout_fails_closed(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, request_timeout_s=0.1)) as client:
        stub.delay_s = 0.3
        response = await client.post("/v1/check", json={"text": CLEAN})
        stub.delay_s = 0.0
        exposition = await _metrics(client)
    assert "timeout" in _assert_error(response, 503, "guard_unavailable")["error"]
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") == 1


async def test_a_timeout_in_pass2_is_503_even_when_failing_open(make_settings, stub: StubBackend) -> None:
    """A client can make a check slow; failure_mode=open must never turn that into an unchecked pass (issue 28)."""
    async with asgi_client(_app(make_settings, stub, request_timeout_s=0.1, failure_mode="open")) as client:
        stub.delay_pass2_s = 0.3
        response = await client.post("/v1/check", json={"text": TRIGGERED})
        stub.delay_pass2_s = 0.0
        exposition = await _metrics(client)
    body = _assert_error(response, 503, "guard_unavailable")
    assert "timeout" in body["error"]
    assert "x-guard-failure-mode" not in response.headers
    assert metric_value(exposition, "guard_failure_mode_allowed_total", reason="timeout") is None
    assert metric_value(exposition, "guard_requests_total", decision="error", mode="enforce") == 1


async def test_queue_full_is_429_with_retry_after(make_settings, stub: StubBackend) -> None:
    app = _app(make_settings, stub, max_queue=2, max_texts_per_request=2, max_wait_ms=0)
    async with asgi_client(app) as client:
        stub.gate, stub.entered = threading.Event(), threading.Event()
        first = asyncio.create_task(client.post("/v1/check", json={"text": NEGATIVE}))
        while not stub.entered.is_set():  # the first request now holds the backend
            await asyncio.sleep(0.005)
        second = asyncio.create_task(client.post("/v1/check", json={"texts": [NEGATIVE, NEGATIVE]}))
        while app.state.service.batcher.pending < 2:  # its 2 rows fill the queue
            await asyncio.sleep(0.005)
        third = await client.post("/v1/check", json={"text": NEGATIVE})
        stub.gate.set()
        answers = [await first, await second]
    body = _assert_error(third, 429, "queue_full")
    assert "limit 2" in body["error"]
    assert third.headers["retry-after"] == "1"
    assert [a.status_code for a in answers] == [200, 200]


async def test_canaries_feed_the_live_frr_gauge(make_settings, stub: StubBackend) -> None:
    app = create_app(make_settings(canary_interval_s=0.02, live_rates_min_observations=1), backend=stub)
    async with asgi_client(app) as client:
        value = None
        for _ in range(200):
            await asyncio.sleep(0.02)
            value = metric_value((await client.get("/metrics")).text, "guard_false_reject_ratio", source="canary")
            if value is not None:
                break
    assert value == 0.0  # the bundle's clean canary is predicted positive and passes


async def test_docs_need_no_cdn(make_settings, stub: StubBackend) -> None:
    async with asgi_client(_app(make_settings, stub, api_key="k")) as client:
        page = await client.get("/docs")
        script = await client.get("/docs/assets/swagger-ui-bundle.js")
        schema = await client.get("/openapi.json")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    assert script.status_code == 200 and len(script.content) > 100_000
    assert schema.status_code == 200 and "/v1/check" in schema.json()["paths"]
