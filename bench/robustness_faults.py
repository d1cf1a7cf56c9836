"""Robustness, fault and upstream stages: the backend failing (error, nan, slow, hang, wrong shape) in
both failure modes, and the protected upstream failing (down, slow, 500, garbage).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.robustness_cases import NEGATIVE, Case, count_statuses, guard_thread, metric_sum, triggered_at, upstream
from guard.core.backends import load_backend
from guard.core.types import EncodedBatch


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
            allowed = metric_sum(exposition, "guard_failure_mode_allowed_total")
            marked = sum(a.status_code == 200 and "x-guard-failure-mode" in a.headers for a in answers)
            cases.append(
                Case(
                    f"backend-{fault}-{mode}",
                    "fault",
                    len(texts),
                    silent + abs(marked - allowed) + timed_out_open,
                    "a backend fault is 503 when closed; when open, every let-through is marked and counted; "
                    "a timeout is never let through",
                    {"statuses": count_statuses(answers), "counted_open": allowed},
                )
            )
    return cases


def _silent_pass(answer: httpx.Response, mode: str) -> bool:
    """A 200 that is not marked as unchecked (any 200 when closed), or an error the guard does not give."""
    if answer.status_code != 200:
        return answer.status_code not in (403, 429, 503)  # blocked, refused at capacity, failed closed
    return mode == "closed" or "x-guard-failure-mode" not in answer.headers


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
                    {"statuses": count_statuses(answers), "seconds_per_request": round(seconds, 3)},
                )
            )
        closed_port.close()
    return cases
