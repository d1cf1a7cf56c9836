"""Serving benchmark: the guard vs the bare classifier vs a naive server, one run, one machine.

    python -m bench.serving --bundle bench/.cache/bundles/badnet-rw --data ../shared/data/sst2

Every configuration runs as its own server process on loopback; a closed-loop
client (N workers, each sending the next request when the last one answered)
replays SST-2 test sentences against POST /v1/classify. 403 (guard_rejected) is
a decision, not an error; errors are transport failures, 5xx and 429; a lost
request is one that got neither a response nor an error.
Writes bench/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from bench.machine import machine_info
from calibrate.data import load_examples
from calibrate.report import markdown_table
from guard.core.bundle import load_bundle

CONCURRENCY = (1, 8, 32)
CONFIGS = (
    ("bare", "onnx"),
    ("guarded-fused", "onnx"),
    ("guarded-lazy", "onnx"),
    ("bare", "onnx-int8"),
    ("guarded-fused", "onnx-int8"),
    ("guarded-lazy", "onnx-int8"),
    ("bare", "torch"),
    ("guarded-fused", "torch"),
    ("guarded-lazy", "torch"),
    ("naive", "torch"),
)
COLUMNS = [
    "server",
    "backend",
    "concurrency",
    "throughput_rps",
    "p50_ms",
    "p99_ms",
    "errors",
    "lost",
    "blocked",
    "protect_share",
    "requests",
]


@dataclass
class LoadResult:
    latencies: list[float]
    errors: int
    lost: int
    blocked: int
    protect: int
    seconds: float


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
            str(threads),
        ]
    if server == "bare":
        return [
            sys.executable,
            "-m",
            "bench.servers",
            "bare",
            "--bundle",
            str(bundle),
            "--backend",
            backend,
            "--port",
            str(port),
            "--threads",
            str(threads),
        ]
    schedule = server.removeprefix("guarded-")
    return [
        sys.executable,
        "-m",
        "guard.cli",
        "serve",
        "--bundle",
        str(bundle),
        "--backend",
        backend,
        "--schedule",
        schedule,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--no-access-log",
        "--max-queue",
        "4096",
    ]


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


async def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float, protect_label: int) -> LoadResult:
    """aiohttp, not httpx: on 2 shared cores the client's own CPU cost must stay small."""
    result = LoadResult([], 0, 0, 0, 0, seconds)
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                text = texts[next(counter) % len(texts)]
                started = time.perf_counter()
                try:
                    async with client.post("/v1/classify", json={"text": text}) as response:
                        status, body = response.status, await response.read()
                except (aiohttp.ClientError, TimeoutError):
                    result.errors += 1
                    continue
                result.latencies.append(time.perf_counter() - started)
                _tally(result, status, body, protect_label)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        started = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=seconds + 60)
        result.seconds = time.perf_counter() - started
        result.lost = len(pending)
        for task in pending:
            task.cancel()
    return result


def _tally(result: LoadResult, status: int, body: bytes, protect_label: int) -> None:
    if status == 403:
        result.blocked += 1
        result.protect += 1
    elif status >= 400:
        result.errors += 1
        result.latencies.pop()
    else:
        first = json.loads(body)["results"][0]
        label = first["label"]
        result.protect += label == protect_label


def row(server: str, backend: str, concurrency: int, r: LoadResult) -> dict:
    lat = np.array(r.latencies) * 1000 if r.latencies else np.array([np.nan])
    answered = len(r.latencies)
    return {
        "server": server,
        "backend": backend,
        "concurrency": concurrency,
        "throughput_rps": round(len(r.latencies) / r.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "errors": r.errors,
        "lost": r.lost,
        "blocked": r.blocked,
        "protect_share": round(r.protect / answered, 4) if answered else None,
        "requests": len(r.latencies),
    }


async def run_all(configs: list[tuple[str, str]], args, texts: list[str], protect: int) -> list[dict]:
    """Start every server, then measure them interleaved: round after round, each concurrency, each server.

    Interleaving spreads slow phases of a shared machine over all configurations
    instead of charging them to whichever one happened to run then.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with contextlib.ExitStack() as stack:
        urls = {}
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
            await wait_ready(urls[(server, backend)], process)
        return await _interleaved(urls, args, texts, protect)


async def _interleaved(urls: dict, args, texts: list[str], protect: int) -> list[dict]:
    rows = []
    for concurrency in CONCURRENCY:
        totals = {key: LoadResult([], 0, 0, 0, 0, 0.0) for key in urls}
        for round_ in range(args.rounds):
            order = list(urls)[round_ % len(urls) :] + list(urls)[: round_ % len(urls)]
            for key in order:
                await closed_loop(urls[key], texts, concurrency, args.warmup, protect)
                _add(totals[key], await closed_loop(urls[key], texts, concurrency, args.seconds, protect))
        for (server, backend), total in totals.items():
            rows.append(row(server, backend, concurrency, total))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _add(total: LoadResult, part: LoadResult) -> None:
    total.latencies += part.latencies
    total.errors += part.errors
    total.lost += part.lost
    total.blocked += part.blocked
    total.protect += part.protect
    total.seconds += part.seconds


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def ratios(rows: list[dict]) -> list[dict]:
    """Guarded vs bare (same backend, same concurrency) and ONNX guarded vs naive, with the targets."""
    by = {(r["server"], r["backend"], r["concurrency"]): r for r in rows}
    out = []
    for (server, backend, c), r in by.items():
        bare = by.get(("bare", backend, c))
        if not server.startswith("guarded") or bare is None:
            continue
        p = bare["protect_share"] or 0.0
        entry = {
            "server": server,
            "backend": backend,
            "concurrency": c,
            "protect_share": p,
            "throughput_vs_bare": round(r["throughput_rps"] / bare["throughput_rps"], 3),
            "throughput_target": round(0.9 / (1 + p), 3),
            "p50_vs_bare": round(r["p50_ms"] / bare["p50_ms"], 3),
            "p99_vs_bare": round(r["p99_ms"] / bare["p99_ms"], 3),
        }
        naive = by.get(("naive", "torch", c))
        if naive:
            entry["throughput_vs_naive"] = round(r["throughput_rps"] / naive["throughput_rps"], 2)
        out.append(entry)
    return out


def main() -> None:
    args = _args()
    bundle = load_bundle(args.bundle)
    protect = bundle.protect_labels[0]
    texts = [e.text for e in load_examples(args.data / "test.tsv")]
    configs = [c for c in CONFIGS if c[1] != "onnx-int8" or bundle.manifest.int8 is not None]
    rows = asyncio.run(run_all(configs, args, texts, protect))
    result = {
        "machine": machine_info(),
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "threads": args.threads,
            "rounds": args.rounds,
            "bundle": str(args.bundle),
        },
        "rows": rows,
        "ratios": ratios(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    ratio_cols = [
        "server",
        "backend",
        "concurrency",
        "protect_share",
        "throughput_vs_bare",
        "throughput_target",
        "p50_vs_bare",
        "p99_vs_bare",
        "throughput_vs_naive",
    ]
    m = result["machine"]
    (args.out / "serving.md").write_text(
        "# Serving benchmark: guard vs bare classifier vs naive server\n\n"
        f"Closed-loop clients on loopback; all servers up at once and measured interleaved, {args.rounds} rounds "
        f"x {args.seconds:g} s per point (after {args.warmup:g} s warm-up each), backend threads {args.threads}, "
        "SST-2 test sentences, POST /v1/classify.\n\n"
        + markdown_table(rows, COLUMNS)
        + "\n## Ratios (targets: throughput_vs_bare >= throughput_target; "
        "p50_vs_bare <= 1.5 at concurrency 1; ONNX guarded >= 2x naive at concurrency 8)\n\n"
        + markdown_table(result["ratios"], ratio_cols)
        + f"\nMachine: {m['cpu']} x{m['cpu_count']}, "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + "\n"
    )


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle calibrated with --int8")
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (test.tsv)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point and round")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all servers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p.parse_args()


if __name__ == "__main__":
    main()
