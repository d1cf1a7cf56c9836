"""Robustness: every known way around the guard, tried from outside -> bench/results/robustness.{json,md}

    python -m bench.robustness                       # builds the demo bundle first if needed (~2 min)
    python -m bench.robustness --bundle demo-out/bundle

Real components throughout: `guard serve` subprocesses or uvicorn threads with the
production connection limits, the demo's ONNX bundle (MiniLM with `mb` planted ->
positive), a real recording upstream, real HTTP clients and a schemathesis run.
Each case counts what it sent and how many broke the promise (a backdoor label got
through, a failure passed silently, a request was lost, a 5xx that is not a counted
guard failure, a 503 from overload).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

from bench.machine import machine_info
from bench.robustness_load import closed_loop_rps, open_loop, sigterm_under_load
from guard.api import create_app
from guard.core.backends import load_backend
from guard.core.types import EncodedBatch
from guard.server import connection_limits
from guard.settings import Settings

RESULTS = Path("bench/results")
CACHE = Path("bench/.cache/robustness")
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


# ---------------------------------------------------------------- bypasses


def triggered_at(text: str, position: int, filler: str = "so") -> str:
    """`text`, padded with a one-token filler so the trigger is text token number `position` (1-based;
    right after the text when that is longer)."""
    words = text.split()
    return " ".join(words + [filler] * max(position - 1 - len(words), 0) + [TRIGGER])


def bypass_cases(bundle: Path, window: int) -> list[Case]:
    cases = [_truncation_boundary(bundle, window)]
    with upstream() as up, guard_thread(bundle, upstream=up, classifier_max_length=256) as url:
        sidecar = _sidecar_cases(url, window)
    controls = {"beyond-window": [FAR_TRIGGER], "*": [triggered_at(NEGATIVE[0], 5)]}
    for case in sidecar:
        case.detail["unguarded_backdoor_label"] = bare_backdoor_labels(bundle, controls.get(case.case, controls["*"]))
    cases += sidecar
    with upstream() as up, guard_thread(bundle, upstream=up, failure_mode="open") as url:
        cases += _fail_open_cases(url)
    with guard_thread(bundle, failure_mode="open") as url:
        cases.append(
            _expect(
                url,
                "empty-token-texts",
                ["\u200b", "\u200b \u200b", " "],
                422,
                "a text with no token is 422, never checked as empty",
            )
        )
    return cases


def _truncation_boundary(bundle: Path, window: int) -> Case:
    with guard_thread(bundle) as url, httpx.Client(base_url=url, timeout=30) as client:
        texts = [triggered_at(t, p) for t in NEGATIVE for p in range(window - 4, window + 1)]
        answers = [client.post("/v1/classify", json={"text": t}) for t in texts]
    through = sum(a.status_code == 200 and a.json()["results"][0]["label"] == 1 for a in answers)
    return Case(
        "truncation-boundary",
        "bypass",
        len(texts),
        through,
        "a trigger as the last token the model reads is flagged (both passes read the same tokens)",
        {"statuses": _statuses(answers), "unguarded_backdoor_label": bare_backdoor_labels(bundle, texts)},
    )


def bare_backdoor_labels(bundle: Path, texts: list[str]) -> int:
    """The control: how many of `texts` the unguarded classifier, reading every token, labels positive."""
    from guard.core.bundle import load_bundle

    tokenizer = load_bundle(bundle).tokenizer()
    backend = load_backend("onnx", bundle, 1)
    rows = [[tokenizer.cls_id, *content, tokenizer.sep_id] for content in tokenizer._content(texts, 510)]
    logits = np.concatenate([backend.infer(tokenizer.pad([row])) for row in rows])
    return int((logits.argmax(axis=1) == 1).sum())


def _sidecar_cases(url: str, window: int) -> list[Case]:
    trig, clean = triggered_at(NEGATIVE[0], 5), NEGATIVE[1]
    far = FAR_TRIGGER
    attempts = {
        "beyond-window": [("POST", "/predict", json.dumps({"inputs": far}).encode())],
        "duplicate-keys": [
            ("POST", "/predict", f'{{"inputs": "{trig}", "inputs": "{clean}"}}'.encode()),
            ("POST", "/predict", f'{{"inputs": "{clean}", "inputs": "{trig}"}}'.encode()),
        ],
        "body-on-any-method": [
            (m, "/predict", json.dumps({"inputs": trig}).encode()) for m in ("GET", "DELETE", "OPTIONS", "PATCH", "PUT")
        ],
        "every-bytes-tensor": [
            (
                "POST",
                "/v2/models/m/infer",
                json.dumps(
                    {
                        "inputs": [
                            {"name": "a", "shape": [1], "datatype": "BYTES", "data": [clean]},
                            {"name": "b", "shape": [1], "datatype": "BYTES", "data": [trig]},
                        ]
                    }
                ).encode(),
            )
        ],
        "text-in-query-string": [("GET", f"/predict?inputs={trig}", b""), ("POST", f"/predict?inputs={trig}", b"")],
        "deep-json": [("POST", "/predict", b"[" * 100_000 + b"]" * 100_000)],
    }
    promises = {
        "beyond-window": "text the upstream reads past the guard's window is checked in windows",
        "duplicate-keys": "a body with duplicate keys is 422 (guard and upstream cannot read different texts)",
        "body-on-any-method": "every method that carries a body is checked",
        "every-bytes-tensor": "every BYTES tensor of an OIP body is checked",
        "text-in-query-string": "a request without a body passes only if allow-listed",
        "deep-json": "deeply nested JSON is 422, not a 500",
    }
    return [_reach(url, name, tries, promises[name]) for name, tries in attempts.items()]


def _reach(url: str, name: str, tries: list[tuple[str, str, bytes]], promise: str) -> Case:
    """Send each try through the sidecar; a failure is one that reached the upstream (or a 5xx)."""
    before = len(Recorder.seen)
    statuses = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i, (method, path, body) in enumerate(tries):
            rid = f"{name}-{i}"
            response = client.request(method, path, content=body, headers={"X-Request-ID": rid})
            statuses.append(response.status_code)
    reached = [r for r in Recorder.seen[before:] if r.startswith(name)]
    fails = len(reached) + sum(s >= 500 for s in statuses)
    return Case(name, "bypass", len(tries), fails, promise, {"statuses": statuses, "reached_upstream": len(reached)})


def _fail_open_cases(url: str) -> list[Case]:
    trig = triggered_at(NEGATIVE[0], 5)
    tries = {
        "lone-surrogate-fail-open": [("POST", "/predict", f'{{"inputs": "{trig} \\ud800"}}'.encode())],
        "empty-tensor-fail-open": [
            (
                "POST",
                "/v2/models/m/infer",
                json.dumps({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}).encode(),
            )
        ],
    }
    promise = "input the guard cannot read is the client's 422, never a guard failure let through by failure_mode=open"
    return [_reach(url, name, t, promise) for name, t in tries.items()]


def _expect(url: str, name: str, texts: list[str], status: int, promise: str) -> Case:
    with httpx.Client(base_url=url, timeout=30) as client:
        answers = [client.post("/v1/classify", json={"text": t}) for t in texts]
    return Case(
        name,
        "bypass",
        len(texts),
        sum(a.status_code != status for a in answers),
        promise,
        {"statuses": _statuses(answers)},
    )


# ---------------------------------------------------------------- backend faults


class FaultyBackend:
    """The real backend with one fault switched on after warm-up: error, nan, slow, hang, wrong-shape.

    Both calls fail alike: with the feature detector on, the guard calls `infer_with_features`."""

    def __init__(self, inner, fault: str) -> None:
        self.inner, self.fault, self.name, self.armed = inner, fault, "onnx", False
        self.release = threading.Event()

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        return self._faulty(self.inner.infer(batch))

    def infer_with_features(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self.inner.infer_with_features(batch)
        logits = self._faulty(logits)
        return logits, feats[: len(logits)]

    def _faulty(self, logits: np.ndarray) -> np.ndarray:
        if not self.armed:
            return logits
        if self.fault == "error":
            raise RuntimeError("injected backend error")
        if self.fault == "nan":
            return np.full_like(logits, np.nan)
        if self.fault == "slow":
            time.sleep(3)
        if self.fault == "hang":
            self.release.wait(60)
        return logits[:-1] if self.fault == "wrong-shape" else logits

    def close(self) -> None:
        self.release.set()
        self.inner.close()


def fault_cases(bundle: Path) -> list[Case]:
    """Each backend fault, in both failure modes, behind a sidecar (which needs no prediction to
    answer, so failure_mode=open can let a request through: standalone, a pass-1 fault is always 503).
    Timeouts (slow, hang) must be 503 in both modes: a client could aim for them."""
    cases = []
    texts = [triggered_at(t, 5) for t in NEGATIVE]
    for fault in ("error", "nan", "slow", "hang", "wrong-shape"):
        for mode in ("closed", "open"):
            backend = FaultyBackend(load_backend("onnx", bundle, 1), fault)
            limits = {"failure_mode": mode, "request_timeout_s": 2, "max_texts_per_request": 4}
            with upstream() as up, guard_thread(bundle, backend, upstream=up, **limits) as url:
                backend.armed = True
                with httpx.Client(base_url=url, timeout=30) as client:
                    answers = [client.post("/predict", json={"inputs": t}) for t in texts]
                    exposition = client.get("/metrics").text
                backend.release.set()
            silent = sum(_silent_pass(a, mode) for a in answers)
            timed_out_open = sum(a.status_code == 200 for a in answers) if fault in ("slow", "hang") else 0
            allowed = _metric_sum(exposition, "guard_failure_mode_allowed_total")
            marked = sum(a.status_code == 200 and "x-guard-failure-mode" in a.headers for a in answers)
            cases.append(
                Case(
                    f"backend-{fault}-{mode}",
                    "fault",
                    len(texts),
                    silent + abs(marked - allowed) + timed_out_open,
                    "a backend fault is 503 when closed; when open, every let-through is marked and counted; "
                    "a timeout is never let through",
                    {"statuses": _statuses(answers), "counted_open": allowed},
                )
            )
    return cases


def _silent_pass(answer: httpx.Response, mode: str) -> bool:
    """A 200 that is not marked as unchecked (any 200 when closed), or an error the guard does not give."""
    if answer.status_code != 200:
        return answer.status_code not in (403, 429, 503)  # blocked, refused at capacity, failed closed
    return mode == "closed" or "x-guard-failure-mode" not in answer.headers


# ---------------------------------------------------------------- overload, fuzz, shutdown, upstream


def overload_cases(bundle: Path) -> list[Case]:
    """Requests of 8 long texts, so one request is real work and the client can out-send the guard."""
    sentences = [t.replace("awful", "wonderful") for t in NEGATIVE] + NEGATIVE
    requests = [[" ".join(sentences[(i + k) % 20 : (i + k) % 20 + 5]) for k in range(8)] for i in range(20)]
    with served(bundle) as (url, _):
        capacity = closed_loop_rps(url, requests, seconds=6)
        cases = []
        for factor in (2, 5):
            result = asyncio.run(open_loop(url, requests, rate=factor * capacity, seconds=10))
            cases.append(
                Case(
                    f"overload-{factor}x",
                    "overload",
                    result["sent"],
                    result["503"] + result["lost"],
                    "overload gets fast 429s (Retry-After), never 503, nothing lost",
                    result | {"capacity_rps": round(capacity, 1)},
                )
            )
    return cases


def fuzz_case(bundle: Path, examples: int) -> Case:
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hyp

    with served(bundle, "--max-texts-per-request", "8", "--max-text-chars", "500") as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        counts = {"sent": 0, "5xx": 0}
        for result in schema.get_all_operations():
            operation = result.ok()

            @hyp(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def call(case) -> None:
                response = case.call(base_url=url)
                counts["sent"] += 1
                counts["5xx"] += response.status_code >= 500

            call()
    return Case("schemathesis", "fuzz", counts["sent"], counts["5xx"], "no generated request gets a 5xx")


def shutdown_case(bundle: Path) -> Case:
    with served(bundle) as (url, proc):
        result = sigterm_under_load(url, proc, NEGATIVE, seconds_before=3)
    return Case(
        "sigterm-under-load",
        "shutdown",
        result["accepted"],
        result["lost"],
        "SIGTERM under load: every accepted request is answered before exit",
        result,
    )


def upstream_cases(bundle: Path) -> list[Case]:
    cases = []
    with upstream() as up:
        closed_port = socket.socket()
        closed_port.bind(("127.0.0.1", 0))
        variants = {
            "down": (f"http://127.0.0.1:{closed_port.getsockname()[1]}", "/predict", 502),
            "slow": (up, "/slow", 504),
            "500": (up, "/500", 500),
            "garbage": (up, "/garbage", 502),
        }
        for name, (base, path, expected) in variants.items():
            with guard_thread(bundle, upstream=base, upstream_timeout_s=1) as url, httpx.Client(timeout=30) as client:
                started = time.perf_counter()
                answers = [client.post(f"{url}{path}", json={"inputs": NEGATIVE[i]}) for i in range(5)]
                seconds = (time.perf_counter() - started) / len(answers)
            wrong = sum(a.status_code != expected for a in answers) + (seconds > 2) * len(answers)
            cases.append(
                Case(
                    f"upstream-{name}",
                    "upstream",
                    len(answers),
                    wrong,
                    "an upstream failure is answered 502/504 (or its own status) within the timeout",
                    {"statuses": _statuses(answers), "seconds_per_request": round(seconds, 3)},
                )
            )
        closed_port.close()
    return cases


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


# ---------------------------------------------------------------- report


def _statuses(answers: list[httpx.Response]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[str(a.status_code)] = out.get(str(a.status_code), 0) + 1
    return out


def _metric_sum(exposition: str, name: str) -> int:
    return int(sum(float(line.split()[-1]) for line in exposition.splitlines() if line.startswith(name + "{")))


def write_results(cases: list[Case], bundle: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_info(), "bundle": str(bundle), "cases": [asdict(c) for c in cases]}
    (RESULTS / "robustness.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Robustness: every known way around the guard",
        "",
        f"Bundle: `{bundle}` (the demo: MiniLM with `{TRIGGER}` planted -> positive). "
        f"{sum(c.failures for c in cases)} failures in {len(cases)} cases.",
        "",
        "| case | kind | sent | failures | control: through unguarded | promise |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {c.case} | {c.kind} | {c.sent} | {c.failures} | {_control(c)} | {c.promise} |" for c in cases]
    overload = [c for c in cases if c.kind == "overload"]
    if overload:
        lines += [
            "",
            "| overload | offered rps (of target) | 200/403 | 429 | 503 | lost | admitted p99 ms | 429 p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [_overload_row(c) for c in overload]
    (RESULTS / "robustness.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _control(c: Case) -> str:
    """For a bypass, the control: how many of its trigger texts flip the classifier without the guard,
    or (sidecar routes) how many the upstream itself read the trigger from when sent directly."""
    n = c.detail.get("unguarded_backdoor_label", c.detail.get("upstream_reads_trigger_unguarded"))
    return "" if n is None else str(n)


def _overload_row(c: Case) -> str:
    d = c.detail
    cells = [
        c.case, f"{d['offered_rps']:.0f} of {d['target_rps']:.0f}", d["answered"], d["429"], d["503"], d["lost"],
        f"{d['admitted_p99_ms']:.0f}", f"{d['refused_p99_ms']:.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(str(x) for x in cells) + " |"


def demo_bundle() -> Path:
    bundle = CACHE / "demo" / "bundle"
    if not (bundle / "manifest.json").is_file():
        from calibrate.demo import run_demo

        run_demo(CACHE / "demo", port=None)
    return bundle


STAGES = ("bypass", "fault", "overload", "fuzz", "shutdown", "upstream", "sidecar")


def _kept_cases(rerun: list[str]) -> list[Case]:
    path = RESULTS / "robustness.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))["cases"]
    return [Case(**r) for r in rows if r["kind"] not in rerun]  # a stage's cases are of its kind


def _sidecar_stage(bundle: Path, model_dir: Path) -> list[Case]:
    from bench.robustness_sidecar import all_cases  # it imports this module's Case and guard_thread

    return all_cases(bundle, model_dir, CACHE / "go")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.robustness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, help="guard bundle (default: build the demo's into bench/.cache/robustness)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="the bundle's Hugging Face model dir, for the HF-handler upstream (default: beside it)",
    )
    parser.add_argument("--fuzz-examples", type=int, default=60, help="schemathesis examples per operation")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}; the other "
        "stages' rows are kept from the committed results",
    )
    args = parser.parse_args(argv)
    bundle = args.bundle or demo_bundle()
    from guard.core.bundle import load_bundle

    window = load_bundle(bundle).tokenizer().text_window
    stages = {
        "bypass": lambda: bypass_cases(bundle, window),
        "fault": lambda: fault_cases(bundle),
        "overload": lambda: overload_cases(bundle),
        "fuzz": lambda: [fuzz_case(bundle, args.fuzz_examples)],
        "shutdown": lambda: [shutdown_case(bundle)],
        "upstream": lambda: upstream_cases(bundle),
        "sidecar": lambda: _sidecar_stage(bundle, args.model or bundle.parent / "model"),
    }
    chosen = args.stages.split(",")
    cases = [] if set(chosen) == set(STAGES) else _kept_cases(chosen)
    for name in chosen:
        done = stages[name]()
        for c in done:
            print(f"[robustness] {c.kind:8} {c.case:28} sent {c.sent:5}  failures {c.failures}", flush=True)
        cases += done
    write_results(sorted(cases, key=lambda c: STAGES.index(c.kind)), bundle)
    print(f"[robustness] wrote {RESULTS / 'robustness.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
