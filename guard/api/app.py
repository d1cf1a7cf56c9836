"""App factory: settings in, FastAPI app out. Tests inject a backend and a registry."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry

from guard import __version__
from guard.api import proxy, routes
from guard.api.errors import install_error_handlers
from guard.api.service import GuardService
from guard.core.backends import load_backend
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
    settings: Settings, backend: Backend | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    """Build the app. The bundle is loaded and verified, and the backend warmed up, in the lifespan."""
    registry = registry or CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bundle = load_bundle(settings.bundle)
        engine = backend or load_backend(settings.backend, bundle.path, settings.threads)
        metrics = GuardMetrics(registry, engine.name if backend else settings.backend)
        svc = GuardService(settings, bundle, engine, metrics)
        app.state.service = svc
        async with httpx.AsyncClient(
            base_url=settings.upstream or "http://upstream.invalid", timeout=settings.upstream_timeout_s
        ) as client:
            app.state.http = client
            await svc.start()
            log.info(
                "guard ready: bundle %s, backend %s, schedule %s, mode %s",
                bundle.path,
                metrics.backend,
                settings.schedule,
                settings.mode,
            )
            try:
                yield
            finally:
                await svc.stop()  # in-flight requests have drained: uvicorn waits for them first

    app = FastAPI(title="backdoor-guard", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    install_error_handlers(app)
    app.middleware("http")(_request_context)
    app.include_router(routes.health)
    app.include_router(routes.guarded)
    if settings.upstream:
        app.include_router(proxy.router)  # catch-all: everything not the guard's own goes upstream
    else:
        app.include_router(routes.standalone)
    return app


async def _request_context(request: Request, call_next) -> Response:
    """Request id (taken from X-Request-ID or made), total time, and a log line per request."""
    rid = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:200]
    token = request_id_var.set(rid)
    started = time.perf_counter()
    try:
        response = await call_next(request)
        _finish(request, response, rid, time.perf_counter() - started)
    finally:
        request_id_var.reset(token)
    return response


def _finish(request: Request, response: Response, rid: str, elapsed: float) -> None:
    response.headers["x-request-id"] = rid
    timing = response.headers.get("server-timing")
    total = f"total;dur={elapsed * 1000:.2f}"
    response.headers["server-timing"] = f"{timing}, {total}" if timing else total
    if request.url.path not in ("/metrics", "/healthz", "/readyz"):
        svc = getattr(request.app.state, "service", None)
        if svc is not None:
            svc.metrics.request_duration.labels(_endpoint(request)).observe(elapsed)
        log.info("%s %s -> %d in %.1f ms", request.method, request.url.path, response.status_code, elapsed * 1000)


def _endpoint(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "proxy") if route is not None else "unmatched"
