"""`guard serve`: settings -> verified bundle -> measured capacity -> uvicorn.

Everything that can be wrong with the settings is found before the port is bound,
and said in one line: a bad value, a bundle that does not verify, a request timeout
this machine cannot meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import h11
import uvicorn
import yaml
from prometheus_client import Counter
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from guard.api import create_app
from guard.api.service import measure_capacity, serving_backend, special_tokens_mode
from guard.core.bundle import load_bundle
from guard.core.errors import InputError
from guard.logs import configure_server_logging
from guard.metrics import GuardMetrics
from guard.settings import Settings
from guard.tracing import traced

GRACEFUL_SHUTDOWN_S = 30


def build_settings(overrides: dict) -> Settings:
    """Settings from flags + GUARD_* env + YAML; a bad value becomes one readable line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "settings"
        raise InputError(f"invalid setting {where}: {first['msg']}") from None
    except yaml.YAMLError as exc:  # the YAML source reads --config before any validation
        raise InputError(f"cannot read the --config file: {' '.join(str(exc).split())}") from None


def serve(overrides: dict, verbose: bool = False) -> None:
    settings = build_settings(overrides)
    bundle = load_bundle(settings.bundle)  # fail before binding the port, with the bundle's own message
    configure_server_logging(settings.log_json, verbose)
    backend = serving_backend(settings, bundle.path)
    capacity = measure_capacity(backend, bundle.tokenizer(special_tokens_mode(settings)), settings)
    capacity.validate(settings)
    app = traced(create_app(settings, backend=backend, capacity=capacity), settings)
    with metrics_server(app, settings):
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            **connection_limits(settings, app.state.metrics),
        )


@contextlib.contextmanager
def metrics_server(app, settings: Settings) -> Iterator[None]:
    """With `metrics_port`, a second uvicorn serving only /metrics, in a thread, for as long as the guard runs."""
    if settings.metrics_port is None:
        yield
        return
    from prometheus_client import make_asgi_app

    scrape = make_asgi_app(app.state.metrics.scrape_registry)  # the service port's metrics and the scores
    config = uvicorn.Config(
        scrape, host=settings.host, port=settings.metrics_port, log_config=None, lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="guard-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def connection_limits(settings: Settings, metrics: GuardMetrics) -> dict:
    """uvicorn options that bound what one connection can hold: head size and time, open connections.

    No uvicorn `limit_concurrency`: it counts every open connection, those still sending their
    head included, and answers 503 above it, probes included. Requests in progress are bounded by
    the app (RequestLimits, 429 above max_connections), open connections by `OpenConnections`.
    """
    return {
        "http": head_timeout_protocol(settings, metrics),
        # h11 drops heads past twice the limit (400, unparsed); the app answers a counted 431 between.
        "h11_max_incomplete_event_size": 2 * settings.max_header_bytes,
    }


def head_timeout_protocol(settings: Settings, metrics: GuardMetrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that take longer than `read_timeout_s` to send a request
    head, with one bounded table of this server's open connections (2 x max_connections)."""
    table = OpenConnections(2 * settings.max_connections, metrics.connections_dropped)
    attributes = {"head_timeout_s": settings.read_timeout_s, "open_connections": table}
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), attributes)


class OpenConnections:
    """A server's open connections, oldest first, at most `limit`: a new one past the limit closes the
    oldest connection still awaiting a request head (a slow or idle client) rather than being refused,
    so a probe that sends its head at once gets through a flood of unfinished heads. Every connection
    closed without an answer is counted in `dropped`, by reason."""

    def __init__(self, limit: int, dropped: Counter) -> None:
        self.limit = limit
        self._dropped = dropped
        self._open: dict[HeadTimeoutProtocol, None] = {}  # insertion order: oldest first

    def admit(self, conn: HeadTimeoutProtocol) -> None:
        self._open[conn] = None
        if len(self._open) <= self.limit:
            return
        oldest = next((c for c in self._open if c is not conn and c.awaiting_head()), None)
        if oldest is None:  # every other connection carries a request: only the new one can go
            self.drop(conn, "refused")
        else:
            self.drop(oldest, "shed")

    def drop(self, conn: HeadTimeoutProtocol, reason: str) -> None:
        self._open.pop(conn, None)  # now, not at connection_lost: it must not be picked twice
        self._dropped.labels(reason).inc()
        conn.close()

    def count(self, reason: str) -> None:
        self._dropped.labels(reason).inc()

    def discard(self, conn: HeadTimeoutProtocol) -> None:
        self._open.pop(conn, None)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn times out idle keep-alive connections but not a client that trickles its headers;
    h11 (unlike httptools) also bounds their size (h11_max_incomplete_event_size)."""

    head_timeout_s = 10.0
    drain_wait_s = 1.0  # on shutdown, how long a fresh connection may still send its request
    open_connections: OpenConnections  # one per server, set by head_timeout_protocol
    _head_timer: asyncio.TimerHandle | None = None
    _draining = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        self.open_connections.admit(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answer the request that was on the wire, then close
        if self.awaiting_head():
            self._arm()  # bytes of a head arrived, the head is not complete yet
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.open_connections.discard(self)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the head, or it grew past h11_max_incomplete_event_size: 400, then closed."""
        self.open_connections.count("invalid_head")
        super().send_400_response(msg)

    def shutdown(self) -> None:
        """uvicorn closes every connection without a request in progress at once, including one
        accepted a moment ago whose request is still on the wire: that client gets no answer.
        Such a fresh connection gets `drain_wait_s` to send it; it is answered, then closed."""
        if self.cycle is None and not self._draining:
            self._draining = True
            self.loop.call_later(self.drain_wait_s, self._close_unused)
            return
        super().shutdown()

    def close(self) -> None:
        """Close at once, without an answer (a head that timed out, a connection shed)."""
        self._disarm()
        self.transport.close()

    def awaiting_head(self) -> bool:
        """No request in progress and no complete head yet (a fresh or a keep-alive connection)."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _close_unused(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            super().shutdown()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.awaiting_head() and not self.transport.is_closing():
            self.open_connections.drop(self, "head_timeout")
