"""Load generators for bench.robustness: closed-loop capacity, open-loop overload, SIGTERM under load."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import threading
import time

import httpx
import numpy as np

CLOSED_LOOP_CLIENTS = 8


def closed_loop_rps(url: str, texts: list[list[str]], seconds: float) -> float:
    """Requests per second the guard answers with CLOSED_LOOP_CLIENTS clients, each waiting for its answer."""

    async def run() -> int:
        done = 0
        stop = time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def worker(offset: int) -> None:
                nonlocal done
                for text in itertools.islice(itertools.cycle(texts), offset, None):
                    if time.perf_counter() > stop:
                        return
                    await client.post("/v1/classify", json={"texts": text})
                    done += 1

            await asyncio.gather(*(worker(i) for i in range(CLOSED_LOOP_CLIENTS)))
        return done

    return asyncio.run(run()) / seconds


async def open_loop(url: str, texts: list[list[str]], rate: float, seconds: float) -> dict:
    """Send at `rate` requests/s regardless of answers; count statuses, admitted latency and lost requests.

    The rate actually offered is measured too: on a shared machine the client may fall behind.
    """
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    statuses: dict[str, int] = {}
    admitted_ms: list[float] = []
    refused_ms: list[float] = []
    lost: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(text: list[str]) -> None:
            started = time.perf_counter()
            try:
                response = await client.post("/v1/classify", json={"texts": text})
            except httpx.HTTPError as exc:
                lost[type(exc).__name__] = lost.get(type(exc).__name__, 0) + 1
                return
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            elapsed_ms = (time.perf_counter() - started) * 1000
            if response.status_code in (200, 403):
                admitted_ms.append(elapsed_ms)
            elif response.status_code == 429:
                refused_ms.append(elapsed_ms)

        tasks = []
        begin = time.perf_counter()
        for i, text in enumerate(itertools.islice(itertools.cycle(texts), int(rate * seconds))):
            await asyncio.sleep(max(begin + i / rate - time.perf_counter(), 0))
            tasks.append(asyncio.create_task(one(text)))
        sending_s = time.perf_counter() - begin
        await asyncio.gather(*tasks)
    answered = statuses.get("200", 0) + statuses.get("403", 0)
    return {
        "sent": len(tasks), "target_rps": rate, "offered_rps": len(tasks) / sending_s, "answered": answered,
        "429": statuses.get("429", 0), "503": statuses.get("503", 0), "lost": sum(lost.values()),
        "lost_by_error": lost, "statuses": statuses,
        "admitted_p99_ms": float(np.percentile(admitted_ms, 99)) if admitted_ms else 0.0,
        "refused_p99_ms": float(np.percentile(refused_ms, 99)) if refused_ms else 0.0,
    }  # fmt: skip


def sigterm_under_load(url: str, proc: subprocess.Popen, texts: list[str], seconds_before: float) -> dict:
    """Clients send continuously; SIGTERM after `seconds_before`. Lost: accepted requests never answered."""
    counts = {"accepted": 0, "answered": 0, "lost": 0, "refused": 0}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for text in itertools.cycle(texts):
                if stop.is_set():
                    return
                try:
                    response = client.post("/v1/classify", json={"text": text}, headers={"Connection": "close"})
                except httpx.ConnectError:  # the listening socket is closed: never accepted
                    with lock:
                        counts["refused"] += 1
                    return
                except httpx.HTTPError as exc:
                    with lock:
                        counts["accepted"] += 1
                        counts["lost"] += 1
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return
                with lock:
                    counts["accepted"] += 1
                    counts["answered"] += response.status_code in (200, 403, 503)

    threads = [threading.Thread(target=client_loop) for _ in range(CLOSED_LOOP_CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(seconds_before)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return counts | {"lost_by_error": errors}
