"""A real Prometheus scrapes the real server under concurrent traffic and counts every request.

Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`;
`make test-deps` installs it). Missing binaries FAIL this test: a skipped
metrics test would hide a broken dashboard.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from guard.api import create_app
from guard.settings import Settings
from tests.server_fixtures import (
    CLEAN,
    NEGATIVE,
    TRIGGERED,
    StubBackend,
    running_prometheus,
    uvicorn_thread,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]

THREADS, PER_THREAD = 8, 25
SCRAPE_DEADLINE_S = 30


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH: run `make test-deps` (Debian/Ubuntu: apt-get install prometheus)")
    return path


@pytest.fixture()
def guard_url(stub_bundle: Path) -> Iterator[str]:
    with uvicorn_thread(create_app(Settings(bundle=stub_bundle, max_wait_ms=1), backend=StubBackend())) as url:
        yield url


def _send_traffic(url: str) -> Counter:
    """THREADS clients, PER_THREAD requests each; returns the decisions the server answered."""
    texts = itertools.cycle([CLEAN, TRIGGERED, NEGATIVE, CLEAN])

    def client(batch: list[str]) -> list[str]:
        with httpx.Client(base_url=url, timeout=30) as http:
            out = []
            for text in batch:
                response = http.post("/v1/check", json={"text": text})
                assert response.status_code == 200, response.text
                out.append("block" if response.json()["results"][0]["flagged"] else "allow")
            return out

    batches = [[next(texts) for _ in range(PER_THREAD)] for _ in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        return Counter(d for decisions in pool.map(client, batches) for d in decisions)


def _scraped(prometheus: str) -> dict[str, float]:
    result = httpx.get(f"{prometheus}/api/v1/query", params={"query": "guard_requests_total"}).json()
    assert result["status"] == "success", result
    return {s["metric"]["decision"]: float(s["value"][1]) for s in result["data"]["result"]}


def test_prometheus_counts_every_request(guard_url: str, tmp_path: Path) -> None:
    with running_prometheus(_binary("prometheus"), guard_url, tmp_path, "guard") as prometheus:
        _assert_scraped_counts(prometheus, _send_traffic(guard_url))


def _assert_scraped_counts(prometheus: str, sent: Counter) -> None:
    assert sum(sent.values()) == THREADS * PER_THREAD and set(sent) == {"allow", "block"}
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    scraped: dict[str, float] = {}
    while time.monotonic() < deadline:
        scraped = _scraped(prometheus)
        if scraped == {k: float(v) for k, v in sent.items()}:
            break
        time.sleep(0.5)
    assert scraped == {k: float(v) for k, v in sent.items()}, f"Prometheus saw {scraped}, the guard answered {sent}"
    assert sum(scraped.values()) == THREADS * PER_THREAD
    up = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="guard"}'}).json()["data"]["result"]
    assert [s["value"][1] for s in up] == ["1"]


def test_promtool_accepts_the_exposition(guard_url: str) -> None:
    promtool = _binary("promtool")
    httpx.post(f"{guard_url}/v1/check", json={"texts": [CLEAN, TRIGGERED, NEGATIVE]})
    exposition = httpx.get(f"{guard_url}/metrics").text
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    report = checked.stdout + checked.stderr
    # Exit 1: the exposition does not parse. Exit 3: lint warnings only (naming advice), tolerated.
    assert checked.returncode in (0, 3) and "error while linting" not in report, report
