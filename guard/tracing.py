"""OpenTelemetry traces, off unless `otel_endpoint` is set: a server span per HTTP request
(the ASGI middleware around the app) and a client span per upstream call (httpx), sent
over OTLP/HTTP, and inside each request a span per RAP pass
(`guard.pass1`, `guard.pass2`). The packages are the `otel` extra (the image has them); asked for
without them, `guard serve` refuses to start rather than run untraced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guard.core.errors import InputError
from guard.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

UNTRACED_PATHS = "healthz,readyz,metrics"  # probes and scrapes: a span each would drown the requests


def traced(app: FastAPI, settings: Settings) -> FastAPI:
    """`app`, traced when `settings.otel_endpoint` is set (call before it serves)."""
    if settings.otel_endpoint is None:
        return app
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise InputError(
            "otel_endpoint is set but OpenTelemetry is not installed: pip install 'backdoor-guard[otel]'"
        ) from None
    return instrument(app, OTLPSpanExporter(endpoint=settings.otel_endpoint), settings.model_name)


def instrument(app: FastAPI, exporter: SpanExporter, service_name: str, batch: bool = True) -> FastAPI:
    """Spans of `app`'s requests and of every httpx call in this process, to `exporter`."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    provider = tracer_provider(exporter, service_name, batch)
    app.state.tracer = provider.get_tracer("guard")  # the pipeline's span per pass (guard.pipeline)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider, excluded_urls=UNTRACED_PATHS)
    return app


def tracer_provider(exporter: SpanExporter, service_name: str, batch: bool = True) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider
