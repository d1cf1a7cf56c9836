"""The serving benchmark's client: closed-loop load on one server, what one measured window costs
the server (CPU seconds, batch tokens), and the row a point of the benchmark becomes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import httpx
import numpy as np

from bench.accounting import CpuWindow


@dataclass
class LoadResult:
    latencies: list[float]
    errors: int
    lost: int
    blocked: int
    protect: int
    seconds: float
    server_cpu_s: float = 0.0
    real_tokens: float = 0.0
    padding_tokens: float = 0.0


async def closed_loop(
    url: str,
    texts: list[str],
    concurrency: int,
    seconds: float,
    protect_label: int,
    cursor: Iterator[int] | None = None,
) -> LoadResult:
    """aiohttp, not httpx: on 2 shared cores the client's own CPU cost must stay small.

    `cursor` numbers the requests: one cursor per server, shared by all its windows, walks the
    test set once through instead of sending its first few hundred sentences every window."""
    result = LoadResult([], 0, 0, 0, 0, seconds)
    stop_at = time.perf_counter() + seconds
    counter = itertools.count() if cursor is None else cursor
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


async def measured(
    url: str, pid: int, texts: list[str], concurrency: int, seconds: float, protect: int, cursor: Iterator[int]
) -> LoadResult:
    """One measured window: the load, the server's CPU seconds and its batch tokens over it."""
    before = await batch_tokens(url)
    window = CpuWindow(pid)
    window.start()
    result = await closed_loop(url, texts, concurrency, seconds, protect, cursor)
    window.stop()
    after = await batch_tokens(url)
    result.server_cpu_s = window.cpu_s
    result.real_tokens = after["real"] - before["real"]
    result.padding_tokens = after["padding"] - before["padding"]
    return result


async def batch_tokens(url: str) -> dict[str, float]:
    """guard_batch_tokens_total by kind from /metrics (zeros for a server without it: the naive one)."""
    tokens = {"real": 0.0, "padding": 0.0}
    async with httpx.AsyncClient() as client:
        response = await client.get(url + "/metrics")
    if response.status_code != 200:
        return tokens
    for line in response.text.splitlines():
        if line.startswith("guard_batch_tokens_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            tokens[kind] = float(line.rsplit(" ", 1)[1])
    return tokens


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
        "cpu_ms_per_request": round(1000 * r.server_cpu_s / answered, 2) if answered else None,
        # the naive server pads nothing: one text per forward
        "padded_token_share": round(r.padding_tokens / total, 4)
        if (total := r.real_tokens + r.padding_tokens)
        else 0.0,
    }


def accumulate(total: LoadResult, part: LoadResult) -> None:
    total.latencies += part.latencies
    total.errors += part.errors
    total.lost += part.lost
    total.blocked += part.blocked
    total.protect += part.protect
    total.seconds += part.seconds
    total.server_cpu_s += part.server_cpu_s
    total.real_tokens += part.real_tokens
    total.padding_tokens += part.padding_tokens
