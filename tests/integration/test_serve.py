"""`guard serve` as a user runs it: a subprocess on loopback, loading a real ONNX bundle from disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import CLEAN, NEGATIVE, THRESHOLDS, TRIGGERED, free_port, stop_process, wait_http

pytestmark = pytest.mark.slow

GUARD = str(Path(sys.executable).with_name("guard"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")} | {"GUARD_THREADS": "1"}


@pytest.fixture()
def served(onnx_bundle: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    log = tmp_path / "guard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                GUARD,
                "serve",
                "--bundle",
                str(onnx_bundle),
                "--port",
                str(port),
                "--schedule",
                "fused",
                "--expose-scores",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=60)
            yield f"http://127.0.0.1:{port}", proc, log
        finally:
            stop_process(proc)


def test_guard_serve_answers_checks_on_a_real_bundle(served) -> None:
    url, proc, log = served
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    response = httpx.post(
        f"{url}/v1/check", json={"texts": [CLEAN, TRIGGERED, NEGATIVE]}, headers={"X-Request-ID": "cli-1"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for item in results:
        assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert item["label"] == max(range(2), key=lambda i: item["probs"][i])
        assert item["rap"]["checked"] == (item["label"] == 1)  # the bundle protects label 1 only
        assert item["rap"]["checked"] == (item["rap"]["threshold"] == THRESHOLDS["0.01"])
    metrics = httpx.get(f"{url}/metrics").text
    assert 'guard_inference_duration_seconds_count{backend="onnx",pass="fused"}' in metrics
    proc.terminate()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why it stopped.
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line["message"] == "Application shutdown complete." for line in lines)
    assert any(line["message"].startswith("guard ready") for line in lines)
    assert any(line["request_id"] == "cli-1" and "/v1/check -> 200" in line["message"] for line in lines)


def test_guard_serve_refuses_a_tampered_bundle_before_binding(onnx_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    with (bundle / "canaries.jsonl").open("a") as f:
        f.write('{"text": "planted", "label": 1}\n')
    done = subprocess.run(
        [GUARD, "serve", "--bundle", str(bundle), "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"guard: error: {bundle}: canaries.jsonl does not match its recorded sha256 (modified or corrupted)"
    ]


def test_guard_serve_refuses_a_timeout_this_machine_cannot_meet(onnx_bundle: Path) -> None:
    """Settings are checked against each other and the measured capacity before the port is bound."""
    port = free_port()
    result = subprocess.run(
        [GUARD, "serve", "--bundle", str(onnx_bundle), "--port", str(port), "--request-timeout-s", "0.000001"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode != 0
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("guard: error: request_timeout_s 1e-06 is shorter than one full request takes here")
    assert "Traceback" not in result.stderr


def test_a_request_on_the_wire_at_sigterm_is_answered(served) -> None:
    """uvicorn closed connections accepted a moment before SIGTERM whose request had not arrived yet."""
    url, proc, _ = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"text": CLEAN}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        time.sleep(0.2)  # accepted by the server, nothing sent yet
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        head = "POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection (else: a timeout error)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_metrics_on_their_own_port(onnx_bundle: Path) -> None:
    port, metrics_port = free_port(), free_port()
    argv = [GUARD, "serve", "--bundle", str(onnx_bundle), "--port", str(port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=60)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/check", json={"text": CLEAN}).status_code == 200
        on_service_port = httpx.get(f"http://127.0.0.1:{port}/metrics")
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        stop_process(proc)
    assert on_service_port.status_code == 404 and "metrics_port" in on_service_port.json()["error"]
    assert scraped.status_code == 200 and "guard_requests_total{decision=" in scraped.text
    assert "# TYPE guard_rap_score histogram" in scraped.text  # per-request scores: on metrics_port only


@pytest.mark.parametrize("schedule", ["lazy", "fused"])
def test_both_detectors_serve_the_decisions_guard_check_makes(backdoored, tmp_path: Path, schedule: str) -> None:
    """A bundle `calibrate rap` wrote (RAP + the feature detector): the server flags what the offline
    checker flags, says which detector did, and counts it in guard_flags_total{detector}."""
    from guard.core.backends import load_backend
    from guard.core.bundle import load_bundle
    from guard.core.checker import Checker

    bundle = load_bundle(backdoored.bundle_dir)
    assert bundle.detectors == ("rap", "features")
    texts = [r.text for r in backdoored.poisoned[:12]] + [r.text for r in backdoored.test[:12]]
    expected = Checker.for_bundle(bundle, load_backend("onnx", bundle.path)).check(texts)
    assert any(v.flagged for v in expected)
    port = free_port()
    with (tmp_path / "guard.log").open("w") as out:
        cmd = [GUARD, "serve", "--bundle", str(bundle.path), "--port", str(port), "--schedule", schedule]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", proc, timeout_s=60)
            results = httpx.post(f"{url}/v1/check", json={"texts": texts}, timeout=60).json()["results"]
            assert [r["flagged"] for r in results] == [v.flagged for v in expected]
            assert [r["flagged_by"] for r in results] == [list(v.flagged_by) for v in expected]
            metrics = httpx.get(f"{url}/metrics").text
            for detector in ("rap", "features", "token"):
                count = sum(detector in v.flagged_by for v in expected)
                line = f'guard_flags_total{{detector="{detector}"}} {float(count)}'
                assert (line in metrics) or count == 0, line
        finally:
            stop_process(proc)
