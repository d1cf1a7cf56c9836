"""Typed HTTP errors, each with one status code, and the one handler map."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from guard.batcher import BatcherClosedError, QueueFullError
from guard.core.errors import InputError
from guard.logs import request_id_var


class ServerError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class GuardRejected(ServerError):
    status_code, error_type = 403, "guard_rejected"


class Unauthorized(ServerError):
    status_code, error_type = 401, "unauthorized"


class NotFound(ServerError):
    status_code, error_type = 404, "not_found"


class PayloadTooLarge(ServerError):
    status_code, error_type = 413, "payload_too_large"


class InvalidInput(ServerError):
    status_code, error_type = 422, "invalid_input"


class UnsupportedMediaType(ServerError):
    status_code, error_type = 415, "unsupported_media_type"


class TooManyRequests(ServerError):
    status_code, error_type = 429, "queue_full"


class Forbidden(ServerError):
    status_code, error_type = 403, "not_passthrough"


class NotReady(ServerError):
    status_code, error_type = 503, "not_ready"


class GuardUnavailable(ServerError):
    status_code, error_type = 503, "guard_unavailable"


class UpstreamError(ServerError):
    status_code, error_type = 502, "upstream_error"


class UpstreamTimeout(ServerError):
    status_code, error_type = 504, "upstream_timeout"


def error_body(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type, "request_id": request_id_var.get()}


def error_response(
    state, message: str, error_type: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one way an error reaches a client: the JSON body, counted by reason."""
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.rejections.labels(error_type).inc()
    return JSONResponse(error_body(message, error_type), status, headers=headers)


# Errors raised below the HTTP layer, each with its one HTTP meaning.
MAPPED: dict[type[Exception], tuple[int, str, dict[str, str]]] = {
    InputError: (422, "invalid_input", {}),
    QueueFullError: (429, "queue_full", {"Retry-After": "1"}),
    BatcherClosedError: (503, "not_ready", {}),
}


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(RequestValidationError, _validation)
    for error in MAPPED:
        app.add_exception_handler(error, _mapped)


async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
    return error_response(request.app.state, str(exc), exc.error_type, exc.status_code, exc.headers)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return error_response(request.app.state, message, "invalid_input", 422)


async def _mapped(request: Request, exc: Exception) -> JSONResponse:
    status, error_type, headers = next(v for k, v in MAPPED.items() if isinstance(exc, k))
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": f"{exc.retry_after_s:.0f}"}
    return error_response(request.app.state, str(exc), error_type, status, headers)
