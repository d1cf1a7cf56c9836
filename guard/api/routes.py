"""Endpoints. Each one translates HTTP to a service call and back; nothing more."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guard.api import schemas
from guard.api.errors import GuardRejected, GuardUnavailable, InvalidInput, NotFound, NotReady
from guard.api.service import GuardService, Outcome
from guard.core.types import Verdict
from guard.logs import request_id_var

FLAG_HEADER = "X-Guard-Flagged"
FAILURE_HEADER = "X-Guard-Failure-Mode"
DECISION_HEADER = "X-Guard-Decision-Id"
DETECTORS_HEADER = "X-Guard-Detectors"  # only in bare mode (detectors=none): nothing was checked
ERRORS = {code: {"model": schemas.ErrorResponse} for code in (401, 403, 413, 422, 429, 503)}


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a
# thread pool, a thread hop per request that cost milliseconds on 2 busy cores.
async def service(request: Request) -> GuardService:
    svc: GuardService | None = getattr(request.app.state, "service", None)
    if svc is None or not svc.ready:
        raise NotReady("the guard is starting or stopping")
    return svc


# The API key (and the feedback key) are checked in guard.api.limits, before the body is read.
Svc = Annotated[GuardService, Depends(service)]
guarded = APIRouter(responses=ERRORS)
standalone = APIRouter(responses=ERRORS)
health = APIRouter()


def guard_headers(outcome: Outcome, svc: GuardService) -> dict[str, str]:
    """Timing, flag and failure headers shared by every guarded endpoint (and the 403)."""
    headers = {
        "Server-Timing": f"queue;dur={outcome.queue_seconds * 1000:.2f}, "
        f"compute;dur={outcome.compute_seconds * 1000:.2f}"
    }
    if svc.pipeline.bare:
        headers[DETECTORS_HEADER] = "none"
    if outcome.decision_id:
        headers[DECISION_HEADER] = outcome.decision_id
    if outcome.failed_open:
        headers[FAILURE_HEADER] = f"open; unchecked ({outcome.failed_open})"
    if svc.settings.mode == "shadow" and outcome.flagged:
        headers[FLAG_HEADER] = "true"
    return headers


def enforce(outcome: Outcome, svc: GuardService) -> dict[str, str]:
    """The guard headers; in enforce mode a flagged outcome becomes 403 guard_rejected."""
    headers = guard_headers(outcome, svc)
    if outcome.flagged and svc.settings.mode == "enforce":
        raise GuardRejected("input rejected: it looks like it carries a backdoor trigger", headers)
    return headers


def predictions(outcome: Outcome) -> list[Verdict]:
    if outcome.verdicts is None:  # failed open before pass 1 finished: nothing to answer with
        raise GuardUnavailable("the classifier could not run; no prediction to return")
    return outcome.verdicts


@guarded.post("/v1/check", response_model=schemas.CheckResponse, tags=["guard"])
async def check(body: schemas.TextsRequest, response: Response, svc: Svc):
    """Decision API: verdict per text (label, probabilities, flagged, RAP delta/threshold). Always 200."""
    rid = request_id_var.get()
    outcome = await svc.check(body.items(), rid)
    response.headers.update(guard_headers(outcome, svc))
    items = [_check_item(v, svc, rid) for v in predictions(outcome)]
    return schemas.CheckResponse(request_id=rid, decision_id=outcome.decision_id, results=items)


@standalone.post("/v1/classify", response_model=schemas.ClassifyResponse, tags=["guard"])
async def classify(body: schemas.TextsRequest, response: Response, svc: Svc):
    """Guarded classification: the prediction when clean; 403 guard_rejected when flagged (enforce)."""
    rid = request_id_var.get()
    outcome = await svc.check(body.items(), rid)
    response.headers.update(enforce(outcome, svc))
    results = [
        schemas.Prediction(label=v.label, label_name=svc.labels[v.label], probs=list(v.probs))
        for v in predictions(outcome)
    ]
    return schemas.ClassifyResponse(request_id=rid, decision_id=outcome.decision_id, results=results)


@standalone.post(
    "/v2/models/{name}/infer",
    response_model=schemas.InferResponse,
    response_model_exclude_none=True,
    tags=["open inference protocol"],
)
async def infer(name: str, body: schemas.InferRequest, response: Response, svc: Svc):
    """Open Inference Protocol v2: one BYTES input of texts -> label, probs and flagged outputs."""
    _known_model(name, svc)
    texts = _oip_texts(body)
    rid = body.id or request_id_var.get()
    outcome = await svc.check(texts, rid)
    response.headers.update(enforce(outcome, svc))
    verdicts = predictions(outcome)
    n, k = len(verdicts), len(svc.labels)
    outputs = [
        schemas.InferTensor(name="label", shape=[n], datatype="INT64", data=[v.label for v in verdicts]),
        schemas.InferTensor(name="probs", shape=[n, k], datatype="FP32", data=[p for v in verdicts for p in v.probs]),
        schemas.InferTensor(name="flagged", shape=[n], datatype="BOOL", data=[v.flagged for v in verdicts]),
    ]
    parameters = {"decision_id": outcome.decision_id} if outcome.decision_id else None
    return schemas.InferResponse(model_name=name, id=rid, outputs=outputs, parameters=parameters)


@standalone.get("/v2/models/{name}", tags=["open inference protocol"])
async def model_metadata(name: str, svc: Svc) -> dict:
    _known_model(name, svc)
    return {
        "name": name,
        "platform": f"backdoor-guard/{svc.backend.name}",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probs", "datatype": "FP32", "shape": [-1, len(svc.labels)]},
            {"name": "flagged", "datatype": "BOOL", "shape": [-1]},
        ],
    }


@standalone.get("/v2/models/{name}/ready", response_model=schemas.HealthResponse, tags=["open inference protocol"])
async def model_ready(name: str, svc: Svc):
    _known_model(name, svc)
    return schemas.HealthResponse(status="ready")


async def feedback_enabled(request: Request) -> None:
    """Feedback moves gauges that page people: without a key of its own, anyone could forge it."""
    if request.app.state.settings.feedback_api_key is None:
        raise NotFound("feedback is off: set feedback_api_key (the key of whoever provides the ground truth)")


@guarded.post(
    "/v1/feedback",
    response_model=schemas.FeedbackResponse,
    dependencies=[Depends(feedback_enabled)],
    tags=["guard"],
)
async def feedback(body: schemas.FeedbackRequest, svc: Svc):
    """Ground truth for an earlier decision (its server-issued decision_id): feeds the live FAR/FRR gauges.
    Off (404) unless `feedback_api_key` is set."""
    decision = svc.decisions.pop(body.decision_id)
    if decision is None:
        raise NotFound(f"no recent decision with decision_id {body.decision_id!r} (or feedback was already given)")
    svc.rates.record("feedback", body.poisoned, decision.flagged)
    kind = ("false_accept", "true_reject") if body.poisoned else ("true_accept", "false_reject")
    return schemas.FeedbackResponse(recorded=True, outcome=kind[decision.flagged])


@health.get("/healthz", response_model=schemas.HealthResponse, tags=["health"])
@health.get("/v2/health/live", response_model=schemas.HealthResponse, tags=["health"])
async def live():
    """Liveness: the process answers."""
    return schemas.HealthResponse(status="alive")


@health.get(
    "/readyz", response_model=schemas.HealthResponse, responses={503: {"model": schemas.ErrorResponse}}, tags=["health"]
)
@health.get(
    "/v2/health/ready",
    response_model=schemas.HealthResponse,
    responses={503: {"model": schemas.ErrorResponse}},
    tags=["health"],
)
async def ready(request: Request):
    """Readiness: bundle verified, backend warmed up, not shutting down."""
    await service(request)
    return schemas.HealthResponse(status="ready")


@health.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    port = request.app.state.settings.metrics_port
    if port is not None:
        raise NotFound(f"metrics are served on port {port} (metrics_port)")
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


def _known_model(name: str, svc: GuardService) -> None:
    if name != svc.settings.model_name:
        raise NotFound(f"unknown model {name!r}; this server serves {svc.settings.model_name!r}")


def _oip_texts(body: schemas.InferRequest) -> list[str]:
    tensors = [t for t in body.inputs if t.datatype == "BYTES"]
    if len(tensors) != 1:
        raise InvalidInput(f"expected exactly one BYTES input tensor holding the texts, got {len(tensors)}")
    (tensor,) = tensors
    if not tensor.data:
        raise InvalidInput(f"input {tensor.name!r} holds no texts")
    if not all(isinstance(x, str) for x in tensor.data):
        raise InvalidInput(f"input {tensor.name!r}: every element must be a string")
    return list(tensor.data)


def _check_item(v: Verdict, svc: GuardService, rid: str) -> schemas.CheckItem:
    scores = svc.settings.expose_scores  # off by default: exact deltas help an attacker tune a trigger
    rap = schemas.RapInfo(
        checked=v.rap.checked, score=v.rap.score if scores else None, threshold=v.rap.threshold if scores else None
    )
    return schemas.CheckItem(
        label=v.label,
        label_name=svc.labels[v.label],
        probs=list(v.probs),
        flagged=v.flagged,
        flagged_by=list(v.flagged_by),
        rap=rap,
        request_id=rid,
    )
