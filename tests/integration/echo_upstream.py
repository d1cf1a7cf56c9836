"""A stand-in upstream classifier for the sidecar tests: echoes each request back as JSON.

Run as `python echo_upstream.py PORT`. Every request's method, raw path, headers and
body come back in the response; `/slow?s=N` sleeps N seconds first; `/status/N`
answers with status N; `/gzip` answers gzip-encoded; `/hop` answers with hop-by-hop
headers. `GET /__seen` (asked directly, not through the guard) lists the
X-Request-IDs received so far.
"""

from __future__ import annotations

import base64
import gzip
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SEEN: list[str] = []
LOCK = threading.Lock()


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        if url.path == "/__seen":
            with LOCK:
                return self._send(200, json.dumps(SEEN).encode())
        with LOCK:
            SEEN.append(self.headers.get("x-request-id", ""))
        if url.path == "/slow":
            time.sleep(float(parse_qs(url.query).get("s", ["1"])[0]))
        echo = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body_b64": base64.b64encode(body).decode(),
        }
        payload = json.dumps(echo).encode()
        status = int(url.path.split("/")[2]) if url.path.startswith("/status/") else 200
        if url.path == "/gzip":
            return self._send(status, gzip.compress(payload), {"Content-Encoding": "gzip"})
        if url.path == "/hop":  # hop-by-hop response headers the guard must not pass on
            return self._send(status, payload, {"Connection": "X-Up-Hop", "X-Up-Hop": "1", "Keep-Alive": "timeout=5"})
        return self._send(status, payload)

    def _send(self, status: int, payload: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Upstream", "echo")
        self.send_header("Set-Cookie", "a=1; Path=/")
        self.send_header("Set-Cookie", "b=2; Path=/")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo)
    server.daemon_threads = True
    server.serve_forever()
