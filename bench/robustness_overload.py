"""Robustness, overload, fuzz and shutdown stages, each on `guard serve` as a user runs it: open-loop
load past the measured capacity, a schemathesis run, SIGTERM under load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.robustness_cases import NEGATIVE, Case, served
from bench.robustness_load import closed_loop_rps, open_loop, sigterm_under_load


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
