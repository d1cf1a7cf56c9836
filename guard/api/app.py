"""App factory: settings in, FastAPI app out. Tests inject a backend and a registry."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard import __version__
from guard.api import proxy, routes
from guard.api.docs import install_docs
from guard.api.errors import error_response, install_error_handlers
from guard.api.limits import RequestLimits
from guard.api.service import Capacity, GuardService, serving_backend
from guard.core.backends.base import Backend
from guard.core.bundle import load_bundle
from guard.logs import request_id_var
from guard.metrics import GuardMetrics
from guard.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
An inference guard against backdoor triggers in text classifiers (RAP, EMNLP 2021).
Each input predicted as a protected label is checked a second time with a learned
perturbation token; inputs whose probability barely moves are flagged as poisoned.
"""


def create_app(
    settings: Settings,
    backend: Backend | None = None,
    registry: CollectorRegistry | None = None,
    capacity: Capacity | None = None,
) -> FastAPI:
    """Build the app. The bundle is loaded and verified, and the backend warmed up, in the lifespan.

    `capacity` is what `guard serve` measured before binding the port (else measured at start).
    """
    registry = registry or CollectorRegistry()
    metrics = GuardMetrics(registry, backend.name if backend else settings.backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = load_bundle(settings.bundle)
        engine = backend or serving_backend(settings, bundle.path)
        metrics.backend = engine.name  # onnx-opt when the bundle's optimised graph was loaded
        svc = GuardService(settings, bundle, engine, metrics, capacity, getattr(app.state, "tracer", None))
        app.state.service = svc
        async with httpx.AsyncClient(
            base_url=settings.upstream or "http://upstream.invalid", timeout=settings.upstream_timeout_s
        ) as client:
            app.state.http = client
            await svc.start()
            log.info(
                "guard ready: bundle %s, backend %s, detectors %s, schedule %s, mode %s",
                bundle.path,
                metrics.backend,
                ",".join(svc.detectors),
                settings.schedule,
                settings.mode,
            )
            try:
                yield
            finally:
                await svc.stop()  # in-flight requests have drained: uvicorn waits for them first

    app = FastAPI(
        title="backdoor-guard",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by guard.api.docs from local assets, not a CDN
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestLimits, state=app.state)
    app.add_middleware(RequestContext, state=app.state)  # outermost: every answer carries the request id
    app.include_router(routes.health)
    app.include_router(routes.guarded)
    if settings.upstream:
        app.include_router(proxy.router)  # catch-all: everything not the guard's own goes upstream
    else:
        app.include_router(routes.standalone)
    return app


class RequestContext:
    """Pure ASGI middleware: request id (from X-Request-ID or new), total time, metrics, access log.

    An exception nothing else handled becomes a counted 500 here, with the request id
    (Starlette's last-resort handler runs after the id is gone).

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps every response
    in an extra task and stream, which cost more than a millisecond per request here.
    """

    QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id")
        rid = (given or uuid.uuid4().hex)[:200]
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500

        started_response = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = rid
                total = f"total;dur={(time.perf_counter() - started) * 1000:.2f}"
                timing = headers.get("server-timing")
                headers["server-timing"] = f"{timing}, {total}" if timing else total
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started_response:
                raise  # the response is under way: nothing better to do than drop the connection
            response = error_response(self.state, "internal server error", "internal_error", 500)
            await response(scope, receive, send_with_headers)
        finally:
            self._record(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        path = scope.get("path", "")
        if path in self.QUIET_PATHS:
            return
        self.state.metrics.http_responses.labels(str(status)).inc()
        svc = getattr(self.state, "service", None)
        if svc is not None:
            route = scope.get("route")
            svc.metrics.request_duration.labels(getattr(route, "path", "unmatched")).observe(elapsed)
        if self.state.settings.access_log:
            log.info("%s %s -> %d in %.1f ms", scope.get("method"), path, status, elapsed * 1000)
