"""Serving cost per encoder family, on the tiny offline fixtures: the guard vs its own bare mode.

    python -m bench.serving_families                       # every family, about 4 minutes
    python -m bench.serving_families --families roberta albert --seconds 2 --rounds 3

Each family's fixture (tests/families.py: random-init, fine-tuned with the planted "mb" trigger,
calibrated with the BERT toy's recipe) is built, then served twice from its bundle: `guard serve
--detectors none` (bare) and the guard (lazy schedule, every detector of the bundle), both on the
graph `guard serve` loads by default (model.opt.onnx where the family has an optimiser, model.onnx
otherwise). Every server is up at once and all are measured interleaved, round after round, at one
concurrency, with bench.serving's servers (bench.serving_run) and client (bench.serving_load). The
texts are the fixture's clean test reviews.

Target (issue 30): guarded CPU per request <= 1.05 x (1 + p) x the same server's bare mode, p the
share of requests predicted as the protected label (the ones RAP reads twice). Each round's ratio is
kept beside the pooled one: on a shared machine the rounds show how far the noise reaches.
Writes bench/results/serving_families.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.machine import machine_info
from bench.serving_load import LoadResult, accumulate, closed_loop, measured, row
from bench.serving_report import ratios
from bench.serving_run import free_port, server_command, wait_ready
from calibrate.data import load_examples
from calibrate.demo_corpus import POSITIVE
from calibrate.report import markdown_table
from tests.families import FAMILIES, build_family_toy

SERVERS = ("bare", "guarded-lazy")
TARGET = 1.05


@dataclass(frozen=True, eq=False)
class Fixture:
    family: str
    bundle: Path
    backend: str  # the graph `guard serve` loads by default: onnx-opt where the bundle has model.opt.onnx
    texts: list[str]
    protect: int


def build_fixtures(families: list[str], root: Path) -> list[Fixture]:
    """Each family's toy and bundle under `root` (10-60 s a family, by the load), or the ones already there."""
    out = []
    for family in families:
        toy = root / family / "toy"  # tests/toy_backdoor.py's layout
        if not (toy / "bundle" / "manifest.json").is_file():
            build_family_toy(family, root / family)
        backend = "onnx-opt" if (toy / "bundle" / "model.opt.onnx").is_file() else "onnx"
        texts = [e.text for e in load_examples(toy / "data" / "test.tsv")]
        out.append(Fixture(family, toy / "bundle", backend, texts, POSITIVE))
        print(f"{family}: {backend}", flush=True)
    return out


async def run(fixtures: list[Fixture], args) -> tuple[list[dict], list[dict]]:
    """Start every server, then measure them interleaved; returns the pooled rows and each round's rows."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with contextlib.ExitStack() as stack:
        urls, pids = {}, {}
        for fixture, server in itertools.product(fixtures, SERVERS):
            port = free_port()
            log = stack.enter_context(
                (Path(tempfile.gettempdir()) / f"serving-{fixture.family}-{server}.log").open("w")
            )
            command = server_command(server, fixture.backend, fixture.bundle, port, args.threads)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            stack.callback(_stop, process)
            urls[(fixture, server)], pids[(fixture, server)] = f"http://127.0.0.1:{port}", process.pid
            await wait_ready(urls[(fixture, server)], process)
        return await _interleaved(urls, pids, args)


async def _interleaved(urls: dict, pids: dict, args) -> tuple[list[dict], list[dict]]:
    keys = list(urls)
    cursors = {key: itertools.count() for key in keys}
    totals = {key: LoadResult([], 0, 0, 0, 0, 0.0) for key in keys}
    per_round = []
    for round_ in range(args.rounds):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            fixture, server = key
            url, texts, concurrency = urls[key], fixture.texts, args.concurrency
            await closed_loop(url, texts, concurrency, args.warmup, fixture.protect, cursors[key])
            window = await measured(url, pids[key], texts, concurrency, args.seconds, fixture.protect, cursors[key])
            accumulate(totals[key], window)
            per_round.append(_row(fixture, server, window, args.concurrency) | {"round": round_})
    pooled = [_row(fixture, server, total, args.concurrency) for (fixture, server), total in totals.items()]
    for r in pooled:
        print(json.dumps(r), flush=True)
    return pooled, per_round


def _row(fixture: Fixture, server: str, result: LoadResult, concurrency: int) -> dict:
    return {"family": fixture.family} | row(server, fixture.backend, concurrency, result)


def family_ratios(pooled: list[dict], per_round: list[dict]) -> list[dict]:
    """Per family: guarded vs bare pooled over the rounds (bench.serving_report.ratios), and each round's."""
    out = []
    for family in dict.fromkeys(r["family"] for r in pooled):
        (entry,) = ratios([r for r in pooled if r["family"] == family])
        rounds = [
            ratios([r for r in per_round if r["family"] == family and r["round"] == n])
            for n in sorted({r["round"] for r in per_round})
        ]
        each = [r[0]["cpu_vs_bare_1p"] for r in rounds if r]
        out.append(
            {"family": family}
            | entry
            | {
                "cpu_vs_bare_1p_rounds": each,
                "rounds_median": round(statistics.median(each), 3),
                "met": "yes" if entry["cpu_vs_bare_1p"] <= TARGET else "NO",
            }
        )
    return out


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    ratio_cols = ["family", "backend", "protect_share", "cpu_vs_bare_1p", "rounds_median", "cpu_vs_bare_1p_rounds",
                  "met", "throughput_vs_bare", "p50_vs_bare", "p99_vs_bare"]  # fmt: skip
    row_cols = ["family", "server", "backend", "throughput_rps", "p50_ms", "p99_ms", "errors", "lost", "blocked",
                "protect_share", "requests", "cpu_ms_per_request", "padded_token_share"]  # fmt: skip
    return "".join(
        [
            "# Serving cost per encoder family (tiny offline fixtures)\n\n",
            f"`python -m bench.serving_families --seconds {s['seconds']:g} --rounds {s['rounds']}`: each family's "
            "fixture (tests/families.py, hidden 32, 2 layers) served bare (`--detectors none`) and guarded (lazy "
            f"schedule, every detector of the bundle) on the graph `guard serve` loads by default; {len(s['families'])}"
            f" x 2 servers up at once, measured interleaved, {s['rounds']} rounds x {s['seconds']:g} s per server "
            f"(after {s['warmup']:g} s warm-up each), closed loop at concurrency {s['concurrency']}, backend threads "
            f"{s['threads']}, the fixture's clean test reviews, POST /v1/classify. Target (issue 30): guarded CPU "
            f"per request <= {TARGET} x (1 + p) x bare's (`cpu_vs_bare_1p` <= {TARGET}), pooled over the rounds; "
            f"each round's own ratio is listed to show the noise. {_load(s, m)} Whole run {s['wall_seconds']:g} s.\n\n",
            "## Guarded vs bare, per family\n\n",
            markdown_table(result["ratios"], ratio_cols),
            "\n## Points (pooled over the rounds)\n\n",
            markdown_table(result["rows"], row_cols),
            f"\nMachine: {m['cpu']} x{m['cpu_count']}, {m['platform']}, Python {m['python']}, "
            + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
            + "\n",
        ]
    )


def _load(settings: dict, machine: dict) -> str:
    """The load the run shared its cores with: other work moves a server's CPU per request between rounds."""
    start, end = settings["load_average"], settings["load_average_end"]
    shared = " (other work shared the cores: compare the rounds)" if max(start, end) > machine["cpu_count"] / 2 else ""
    return f"Load average {start:g} at the start, {end:g} at the end, on {machine['cpu_count']} cores{shared}."


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    args = _args()
    started = time.perf_counter()
    load_average = round(os.getloadavg()[0], 2)
    with contextlib.ExitStack() as stack:
        root = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        fixtures = build_fixtures(args.families, root)
        pooled, per_round = asyncio.run(run(fixtures, args))
    result = {
        "machine": machine_info(),
        "settings": {
            "families": args.families,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "threads": args.threads,
            "load_average": load_average,
            "load_average_end": round(os.getloadavg()[0], 2),
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
        "ratios": family_ratios(pooled, per_round),
        "rows": pooled,
        "rounds": per_round,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per server and round")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all servers")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (the target's: 8)")
    p.add_argument("--threads", type=int, default=1, help="backend threads per server (the fixtures are tiny)")
    p.add_argument("--work", type=Path, help="build the fixtures here, reusing those built (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--name", default="serving_families", help="result file names: OUT/NAME.json and OUT/NAME.md")
    return p.parse_args()


if __name__ == "__main__":
    main()
