"""Typed HTTP errors, each with one status code, and the one handler map."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from guard.batcher import BatcherClosedError, QueueFullError
from guard.core.errors import InputError
from guard.logs import request_id_var

log = logging.getLogger(__name__)


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


class TooManyRequests(ServerError):
    status_code, error_type = 429, "queue_full"


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
    app.add_exception_handler(Exception, _unknown)


async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
    return JSONResponse(error_body(str(exc), exc.error_type), exc.status_code, headers=exc.headers)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return JSONResponse(error_body(message, "invalid_input"), 422)


async def _mapped(request: Request, exc: Exception) -> JSONResponse:
    status, error_type, headers = next(v for k, v in MAPPED.items() if isinstance(exc, k))
    return JSONResponse(error_body(str(exc), error_type), status, headers=headers)


async def _unknown(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", "internal_error"), 500)
