"""The serving benchmark's run: the configurations, each one's server command, and every server up
at once, measured interleaved."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serving_load import LoadResult, accumulate, closed_loop, measured, row

CONCURRENCY = (1, 8, 32)
GRAPH_BACKENDS = ("onnx", "onnx-opt", "onnx-int8", "onnx-int8-opt")
GUARD_SERVERS = ("bare", "guarded-lazy", "guarded-fused")
# guarded-lazy runs every detector the bundle has; guarded-lazy-rap the RAP check alone (--detectors rap),
# so a bundle with the feature detector shows what it costs beside RAP (--servers bare guarded-lazy-rap ...)
# guarded-lazy-default: RAP and the features only, so a bundle with the reader detector (`calibrate rap --reader`)
# shows what the reader's pass costs (--servers bare guarded-lazy-default guarded-lazy ...); guarded-lazy-reader:
# RAP, the features and the reader, so a bundle with the switch detector (`calibrate rap --switch`) shows what
# the switch pass costs beside them (--servers bare guarded-lazy-default guarded-lazy-reader guarded-lazy ...)
EXTRA_SERVERS = ("guarded-lazy-rap", "guarded-lazy-default", "guarded-lazy-reader")
# naive on torch's default pool (the backend threads) and on one thread: on these shared cores torch's
# OpenMP pool of 2 ran a forward 3x slower than one thread did; ratios take the better naive row.
NAIVE = (("naive", "torch"), ("naive", "torch-1t"))
CONFIGS = tuple((server, backend) for backend in GRAPH_BACKENDS for server in GUARD_SERVERS) + NAIVE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server: str, backend: str, bundle: Path, port: int, threads: int) -> list[str]:
    if server == "naive":
        return [
            sys.executable,
            "-m",
            "bench.servers",
            "naive",
            "--model",
            str(bundle / "hf"),
            "--port",
            str(port),
            "--threads",
            str(1 if backend == "torch-1t" else threads),
        ]
    command = [
        sys.executable,
        "-m",
        "guard.cli",
        "serve",
        "--bundle",
        str(bundle),
        "--backend",
        backend.removesuffix("-opt"),
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--no-access-log",
        "--max-queue",
        "4096",
    ]
    if not backend.endswith("-opt"):
        command.append("--no-optimized-graphs")  # the exported graph, not the bundle's optimised one
    if server == "bare":
        return [*command, "--detectors", "none"]
    if server == "guarded-lazy-rap":
        return [*command, "--schedule", "lazy", "--detectors", "rap"]
    if server == "guarded-lazy-default":
        return [*command, "--schedule", "lazy", "--detectors", "rap", "features"]
    if server == "guarded-lazy-reader":
        return [*command, "--schedule", "lazy", "--detectors", "rap", "features", "reader"]
    return [*command, "--schedule", server.removeprefix("guarded-")]


async def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if (await client.get(url + "/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError("server did not become ready")


async def run_all(configs: list[tuple[str, str]], args, texts: list[str], protect: int) -> list[dict]:
    """Start every server, then measure them interleaved: round after round, each concurrency, each server.

    Interleaving spreads slow phases of a shared machine over all configurations
    instead of charging them to whichever one happened to run then.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with contextlib.ExitStack() as stack:
        urls, pids = {}, {}
        for server, backend in configs:
            port = free_port()
            log = stack.enter_context((Path(tempfile.gettempdir()) / f"serving-{server}-{backend}.log").open("w"))
            # The server's output goes to a file: a pipe nobody reads fills up and blocks the server.
            process = subprocess.Popen(
                server_command(server, backend, args.bundle, port, args.threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            stack.callback(_stop, process)
            urls[(server, backend)] = f"http://127.0.0.1:{port}"
            pids[(server, backend)] = process.pid
            await wait_ready(urls[(server, backend)], process)
            _check_graph(log.name, server, backend)
        return await _interleaved(urls, pids, args, texts, protect)


def _check_graph(log_path: str, server: str, backend: str) -> None:
    """The guard logs the backend it loaded (onnx-opt when it took the optimised graph)."""
    if server != "naive" and f"backend {backend}," not in Path(log_path).read_text():
        raise RuntimeError(f"{server} did not load backend {backend}; see {log_path}")


async def _interleaved(urls: dict, pids: dict, args, texts: list[str], protect: int) -> list[dict]:
    rows = []
    cursors = {key: itertools.count() for key in urls}
    for concurrency in CONCURRENCY:
        totals = {key: LoadResult([], 0, 0, 0, 0, 0.0) for key in urls}
        for round_ in range(args.rounds):
            order = list(urls)[round_ % len(urls) :] + list(urls)[: round_ % len(urls)]
            for key in order:
                await closed_loop(urls[key], texts, concurrency, args.warmup, protect, cursors[key])
                window = await measured(urls[key], pids[key], texts, concurrency, args.seconds, protect, cursors[key])
                accumulate(totals[key], window)
        for (server, backend), total in totals.items():
            rows.append(row(server, backend, concurrency, total))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
