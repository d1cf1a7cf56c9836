"""OpenTelemetry traces (guard/tracing.py): off by default; on, a real sidecar guard in front
of a real upstream gives one server span per request and one client span per upstream call,
in one trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from guard import tracing
from guard.api import create_app
from guard.core.errors import InputError
from guard.settings import Settings
from tests.server_fixtures import CLEAN, StubBackend, build_stub_bundle, running_echo_upstream, uvicorn_thread


@pytest.fixture()
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    HTTPXClientInstrumentor().uninstrument()  # process-wide: leave other tests untraced


def test_tracing_is_off_unless_an_endpoint_is_set(tmp_path: Path) -> None:
    app = create_app(Settings(bundle=build_stub_bundle(tmp_path / "b")), backend=StubBackend())
    assert tracing.traced(app, Settings(bundle=tmp_path / "b")) is app


def test_a_proxied_request_is_one_trace_with_the_upstream_call(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    with running_echo_upstream() as upstream:
        settings = Settings(bundle=build_stub_bundle(tmp_path / "b"), upstream=upstream, access_log=False)
        app = tracing.instrument(create_app(settings, backend=StubBackend()), exporter, "sentiment", batch=False)
        with uvicorn_thread(app) as url:
            assert httpx.get(f"{url}/readyz").status_code == 200  # a probe: no span
            assert httpx.post(f"{url}/classify", json={"inputs": CLEAN}).status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]  # the probe made none
    (upstream_call,) = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT
        and str(s.attributes.get("url.full", s.attributes.get("http.url", ""))).startswith(upstream)
    ]
    assert server.resource.attributes["service.name"] == "sentiment"
    assert "/classify" in server.name or server.attributes.get("http.target") == "/classify"
    assert upstream_call.context.trace_id == server.context.trace_id  # the upstream call belongs to the request
    in_request = [s for s in spans if s.context.trace_id == server.context.trace_id]  # not the warm-up's
    (pass1,) = [s for s in in_request if s.name == "guard.pass1"]
    (pass2,) = [s for s in in_request if s.name == "guard.pass2"]  # CLEAN is predicted positive: checked
    assert pass1.parent is not None and pass2.parent is not None
    assert pass1.attributes["guard.rows"] == 1


def test_tracing_asked_for_without_the_packages_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    settings = Settings(bundle=build_stub_bundle(tmp_path / "b"), otel_endpoint="http://collector:4318/v1/traces")
    with pytest.raises(InputError, match=r"pip install 'backdoor-guard\[otel\]'"):
        tracing.traced(object(), settings)
