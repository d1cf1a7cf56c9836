"""Serving benchmark: the guard vs its own bare mode vs a naive server, one run, one machine.

    python -m bench.serving_bundle --bundle B --model M --data ../shared/data/sst2 --out B2   # the graphs
    python -m bench.serving --bundle B2 --data ../shared/data/sst2

Every configuration runs as its own server process on loopback: `guard serve` with
`--detectors none` (bare), `--schedule lazy` and `--schedule fused`, on each graph of the
bundle (onnx, onnx-opt, onnx-int8, onnx-int8-opt), and the naive transformers-pipeline
server. A closed-loop client in this (separate) process (N workers, each sending the next
request when the last one answered) replays SST-2 test sentences against POST
/v1/classify. 403 (guard_rejected) is a decision, not an error; errors are transport
failures, 5xx and 429; a lost request is one that got neither a response nor an error.

Per point, besides throughput and latency: `cpu_ms_per_request`, the server process's own
CPU time (utime + stime of all its threads, /proc/<pid>/stat) over the measured windows
divided by the requests it answered, which survives a machine shared with other work; and
`padded_token_share`, padding / all tokens sent to the backend (guard_batch_tokens_total).
Before the servers start, each graph is timed raw (no server) for its achieved GFLOP/s
against the cores' fp32 peak (bench.accounting).
Writes bench/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.accounting import encoder_flops, fp32_peak, sgemm_gflops
from bench.machine import machine_info
from bench.serving_bundle import SUMMARY
from bench.serving_report import markdown, ratios, targets
from bench.serving_run import CONFIGS, EXTRA_SERVERS, GRAPH_BACKENDS, GUARD_SERVERS, NAIVE, run_all
from calibrate.data import load_examples
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle

# The benchmark's parts: serving_run (configurations, servers, the interleaved measurement),
# serving_load (the closed-loop client, a point's row), serving_report (ratios, targets, serving.md).


def raw_backends(bundle_dir: Path, texts: list[str], threads: int, config: dict) -> list[dict]:
    """Each graph without a server: ms per row and achieved GFLOP/s at batch 1 and in length-sorted batches of 32.

    FLOPs are counted on what the backend computes (padded rows), with the encoder's shapes
    from the bundle's hf/config.json; int8 graphs are counted at the same FLOPs (fp32-equivalent).
    """
    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.tokenizer()
    rows = tokenizer.ids(texts)
    shape = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size")}

    def flops(batch_rows) -> int:
        width = max(len(r) for r in batch_rows)
        return len(batch_rows) * encoder_flops(
            width,
            shape["hidden_size"],
            shape["num_hidden_layers"],
            shape["intermediate_size"],
            len(bundle.manifest.model.labels),
        )

    out = []
    for backend_name in GRAPH_BACKENDS:
        backend = load_backend(backend_name, bundle.path, threads)
        for size in (1, 32):
            ordered = sorted(rows, key=len) if size > 1 else rows
            batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
            padded = [tokenizer.pad(b) for b in batches]
            backend.infer(padded[0])
            best = min(_timed_all(backend, padded) for _ in range(2))
            total = sum(flops(b) for b in batches)
            out.append(
                {
                    "backend": backend_name,
                    "batch": size,
                    "rows": len(rows),
                    "ms_per_row": round(1000 * best / len(rows), 3),
                    "gflops": round(total / best / 1e9, 1),
                }
            )
        backend.close()
    return out


def _timed_all(backend, batches) -> float:
    started = time.perf_counter()
    for batch in batches:
        backend.infer(batch)
    return time.perf_counter() - started


def main() -> None:
    args = _args()
    bundle = load_bundle(args.bundle)
    protect = bundle.protect_labels[0]
    texts = [e.text for e in load_examples(args.data / "test.tsv")]
    configs = [(server, backend) for server, backend in _configs(args) if _has_graph(bundle, backend)]
    variants_path = args.bundle / SUMMARY
    variants = json.loads(variants_path.read_text()) if variants_path.is_file() else None
    started = time.perf_counter()
    raw = []
    if args.raw_rows:
        config = json.loads((args.bundle / "hf" / "config.json").read_text())
        raw = raw_backends(args.bundle, texts[: args.raw_rows], args.threads, config)
    peak = fp32_peak(args.threads) | {"sgemm_gflops": round(sgemm_gflops(args.threads), 1)}
    for r in raw:
        r["share_of_peak"] = round(r["gflops"] / peak["gflops"], 3)
        r["share_of_sgemm"] = round(r["gflops"] / peak["sgemm_gflops"], 3)
    client_cpu0 = time.process_time()
    rows = asyncio.run(run_all(configs, args, texts, protect))
    ratio_rows = ratios(rows)
    result = {
        "machine": machine_info(),
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "threads": args.threads,
            "rounds": args.rounds,
            "bundle": str(args.bundle),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "client_cpu_seconds": round(time.process_time() - client_cpu0, 1),
        },
        "rows": rows,
        "ratios": ratio_rows,
        "raw_backends": raw,
        "fp32_peak": peak,
        "graphs": variants,
        "targets": targets(rows, ratio_rows, variants),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result, args))


def _configs(args) -> list[tuple[str, str]]:
    """Every (server, backend) of CONFIGS, or those of --servers x --backends."""
    if not args.servers and not args.backends:
        return list(CONFIGS)
    servers = args.servers or [*GUARD_SERVERS, "naive"]
    backends = args.backends or list(GRAPH_BACKENDS)
    guard = [(s, b) for b in backends for s in servers if s != "naive"]
    return guard + [c for c in NAIVE if "naive" in servers]


def _has_graph(bundle, backend: str) -> bool:
    if backend.startswith("torch"):
        return (bundle.path / "hf").is_dir()
    from guard.core.backends.base import GRAPHS

    return (bundle.path / GRAPHS[backend]).is_file()


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle from bench.serving_bundle (every graph, hf/)")
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (test.tsv)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point and round")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all servers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--raw-rows", type=int, default=256, help="sentences per raw-backend timing (0: none)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--name", default="serving", help="result file names: OUT/NAME.json and OUT/NAME.md")
    p.add_argument("--servers", nargs="+", choices=(*GUARD_SERVERS, *EXTRA_SERVERS, "naive"), help="default: all")
    p.add_argument("--backends", nargs="+", choices=GRAPH_BACKENDS, help="default: every graph the bundle has")
    return p.parse_args()


if __name__ == "__main__":
    main()
