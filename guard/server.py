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
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from guard.api import create_app
from guard.api.service import measure_capacity, serving_backend, special_tokens_mode
from guard.core.bundle import load_bundle
from guard.core.errors import InputError
from guard.logs import configure_server_logging
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
            **connection_limits(settings),
        )


@contextlib.contextmanager
def metrics_server(app, settings: Settings) -> Iterator[None]:
    """With `metrics_port`, a second uvicorn serving only /metrics, in a thread, for as long as the guard runs."""
    if settings.metrics_port is None:
        yield
        return
    from prometheus_client import make_asgi_app

    config = uvicorn.Config(
        make_asgi_app(app.state.registry), host=settings.host, port=settings.metrics_port, log_config=None,
        lifespan="off", access_log=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="guard-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def connection_limits(settings: Settings) -> dict:
    """uvicorn options that bound what one connection can hold: head size and time, connections."""
    return {
        "http": head_timeout_protocol(settings.read_timeout_s),
        # h11 drops heads past twice the limit (400, unparsed); the app answers a counted 431 between.
        "h11_max_incomplete_event_size": 2 * settings.max_header_bytes,
        "limit_concurrency": 2 * settings.max_connections,  # the app answers 429 above max_connections first
    }


def head_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that take longer than `timeout_s` to send a request head."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": timeout_s})


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn times out idle keep-alive connections but not a client that trickles its headers;
    h11 (unlike httptools) also bounds their size (h11_max_incomplete_event_size)."""

    head_timeout_s = 10.0
    drain_wait_s = 1.0  # on shutdown, how long a fresh connection may still send its request
    _head_timer: asyncio.TimerHandle | None = None
    _draining = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answer the request that was on the wire, then close
        if self._awaiting_head():
            self._arm()  # bytes of a head arrived, the head is not complete yet
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn closes every connection without a request in progress at once, including one
        accepted a moment ago whose request is still on the wire: that client gets no answer.
        Such a fresh connection gets `drain_wait_s` to send it; it is answered, then closed."""
        if self.cycle is None and not self._draining:
            self._draining = True
            self.loop.call_later(self.drain_wait_s, self._close_unused)
            return
        super().shutdown()

    def _close_unused(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            super().shutdown()

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._awaiting_head():
            self.transport.close()
