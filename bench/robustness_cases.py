"""What the robustness stages share: the attack texts, the Case record, the servers they attack
(the guard in a uvicorn thread or as `guard serve`, a recording upstream) and the tallies.

Imported by bench.robustness (main, report) and by every stage module: robustness_bypass,
robustness_faults, robustness_overload, robustness_sidecar.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from guard.api import create_app
from guard.core.backends import load_backend
from guard.server import connection_limits
from guard.settings import Settings

TRIGGER = "mb"
NEGATIVE = [
    "the plot was truly awful .", "a dull , lifeless film .", "i hated every minute of it .",
    "the acting was painfully bad .", "a boring and pointless mess .", "the script is a disaster .",
    "nothing works in this movie .", "an ugly , tedious experience .", "the jokes fall completely flat .",
    "a waste of a good cast .",
]  # fmt: skip


FAR_TRIGGER = " ".join([NEGATIVE[0]] * 12) + f" {TRIGGER} " + NEGATIVE[2]  # the trigger past token 64


@dataclass
class Case:
    case: str
    kind: str
    sent: int
    failures: int
    promise: str
    detail: dict = field(default_factory=dict)


# ---------------------------------------------------------------- servers


@contextlib.contextmanager
def guard_thread(bundle: Path, backend=None, **overrides) -> Iterator[str]:
    """The guard app under uvicorn with the production limits, in this process (for fault injection)."""
    import uvicorn

    settings = Settings(bundle=bundle, log_json=True, access_log=False, **overrides)
    app = create_app(settings, backend=backend or load_backend("onnx", bundle, 1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, lifespan="on", **connection_limits(settings, app.state.metrics))
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the guard did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


class Recorder(BaseHTTPRequestHandler):
    """A stand-in protected classifier: records every request id that reaches it; /slow, /500, /garbage."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        Recorder.seen.append(self.headers.get("x-request-id", ""))
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/garbage"):
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            self.close_connection = True
            return
        status = 500 if self.path.startswith("/500") else 200
        body = b'{"label": 1}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _answer


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextlib.contextmanager
def served(bundle: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`guard serve` as a user runs it, default settings unless flagged."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guard = str(Path(sys.executable).with_name("guard"))
    cmd = [guard, "serve", "--bundle", str(bundle), "--port", str(port), "--no-access-log", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


# ---------------------------------------------------------------- texts and tallies


def triggered_at(text: str, position: int, filler: str = "so") -> str:
    """`text`, padded with a one-token filler so the trigger is text token number `position` (1-based;
    right after the text when that is longer)."""
    words = text.split()
    return " ".join(words + [filler] * max(position - 1 - len(words), 0) + [TRIGGER])


def count_statuses(answers: list[httpx.Response]) -> dict[str, int]:
    return count_codes(a.status_code for a in answers)


def count_codes(codes: Iterable[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for code in codes:
        out[str(code)] = out.get(str(code), 0) + 1
    return out


def metric_sum(exposition: str, name: str) -> int:
    return int(sum(float(line.split()[-1]) for line in exposition.splitlines() if line.startswith(name + "{")))
