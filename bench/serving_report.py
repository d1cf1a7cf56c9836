"""The serving benchmark's report: ratios to the bare and naive servers, the issue's targets, and
serving.md."""

from __future__ import annotations

from bench.serving_run import GRAPH_BACKENDS
from calibrate.report import markdown_table

FAR_MARGIN = 0.005  # the target's "keeps FAR within 0.5 points of fp32"
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
    "cpu_ms_per_request",
    "padded_token_share",
]


def ratios(rows: list[dict]) -> list[dict]:
    """Guarded vs the guard's own bare mode (same graph, same concurrency), and vs naive."""
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
            "p50_vs_bare": round(r["p50_ms"] / bare["p50_ms"], 3),
            "p99_vs_bare": round(r["p99_ms"] / bare["p99_ms"], 3),
            # the cost target: guarded CPU per request <= 1.05 x (1 + p) x bare's
            "cpu_vs_bare_1p": round(r["cpu_ms_per_request"] / ((1 + p) * bare["cpu_ms_per_request"]), 3),
        }
        # every detector of the bundle vs fewer: RAP alone, RAP and features, those and the reader
        for name, fewer in (("rap_alone", "guarded-lazy-rap"), ("default", "guarded-lazy-default"),
                            ("reader", "guarded-lazy-reader")):  # fmt: skip
            other = by.get((fewer, backend, c))
            if server == "guarded-lazy" and other is not None:
                entry[f"throughput_vs_{name}"] = round(r["throughput_rps"] / other["throughput_rps"], 3)
                entry[f"cpu_vs_{name}"] = round(r["cpu_ms_per_request"] / other["cpu_ms_per_request"], 3)
        naive = _best_naive(rows, c)
        if naive:
            entry["throughput_vs_naive"] = round(r["throughput_rps"] / naive["throughput_rps"], 2)
            entry["cpu_vs_naive"] = round(r["cpu_ms_per_request"] / naive["cpu_ms_per_request"], 3)
        out.append(entry)
    return out


def _best_naive(rows: list[dict], concurrency: int) -> dict | None:
    """The stronger naive baseline at this concurrency: the higher throughput and the lower CPU per request."""
    naive = [r for r in rows if r["server"] == "naive" and r["concurrency"] == concurrency]
    if not naive:
        return None
    return {
        "throughput_rps": max(r["throughput_rps"] for r in naive),
        "cpu_ms_per_request": min(r["cpu_ms_per_request"] for r in naive),
    }


def targets(rows: list[dict], ratio_rows: list[dict], variants: dict | None) -> list[dict]:
    """The issue's targets, each with the measured number and whether it was met."""
    evaluation = (variants or {}).get("evaluation", {})
    fp32_far = evaluation.get("onnx", {}).get("far")
    keeps_far = [
        b
        for b in GRAPH_BACKENDS
        if b in ("onnx", "onnx-opt")
        or (fp32_far is not None and evaluation.get(b, {}).get("far", 1.0) - fp32_far <= FAR_MARGIN)
    ]
    by = {(r["server"], r["backend"], r["concurrency"]): r for r in ratio_rows}
    lazy8 = {
        b: by[("guarded-lazy", b, 8)]
        for b in keeps_far
        if ("guarded-lazy", b, 8) in by and "throughput_vs_naive" in by[("guarded-lazy", b, 8)]
    }
    best = max(lazy8, key=lambda b: lazy8[b]["throughput_vs_naive"]) if lazy8 else None
    out = []
    for backend, r in lazy8.items():  # vs the better naive row; the best graph keeping FAR is marked
        mark = " (best keeping FAR within 0.5 pt)" if backend == best else ""
        out.append(
            _target(f"guarded-lazy {backend}{mark} throughput / naive's, c=8", r["throughput_vs_naive"], ">= 3",
                    r["throughput_vs_naive"] >= 3)
        )  # fmt: skip
        out.append(
            _target(f"guarded-lazy {backend}{mark} CPU-ms per request / naive's, c=8", r["cpu_vs_naive"], "<= 0.333",
                    r["cpu_vs_naive"] <= 1 / 3)
        )  # fmt: skip
    # the default detectors' targets: on guarded-lazy-default where the run has it (a bundle with the reader)
    default = (
        "guarded-lazy-default" if any(r["server"] == "guarded-lazy-default" for r in ratio_rows) else "guarded-lazy"
    )
    for r in ratio_rows:
        if r["server"] == default and r["concurrency"] == 8:
            out.append(
                _target(
                    f"{default} {r['backend']} CPU per request / ((1+p) x bare), c=8",
                    r["cpu_vs_bare_1p"],
                    "<= 1.05",
                    r["cpu_vs_bare_1p"] <= 1.05,
                )
            )
        if r["server"] == default and r["concurrency"] == 1:
            out.append(
                _target(
                    f"{default} {r['backend']} p50 / bare p50, c=1",
                    r["p50_vs_bare"],
                    "<= 1.4",
                    r["p50_vs_bare"] <= 1.4,
                )
            )
        if "cpu_vs_default" in r and r["concurrency"] == 8:  # issue 31: every detector <= 1.5 x (1 + p) x bare
            out.append(
                _target(
                    f"guarded-lazy {r['backend']}, every detector with the reader, CPU / ((1+p) x bare), c=8",
                    r["cpu_vs_bare_1p"],
                    "<= 1.5",
                    r["cpu_vs_bare_1p"] <= 1.5,
                )
            )
        if r["server"] == "guarded-lazy-reader" and r["concurrency"] == 8:  # the default detectors, beside a switch
            out.append(
                _target(
                    f"guarded-lazy-reader {r['backend']}, rap+features+reader, CPU / ((1+p) x bare), c=8",
                    r["cpu_vs_bare_1p"],
                    "<= 1.5",
                    r["cpu_vs_bare_1p"] <= 1.5,
                )
            )
        if "throughput_vs_rap_alone" in r and r["concurrency"] == 8:
            out.append(
                _target(
                    f"guarded-lazy {r['backend']}, every detector of the bundle, throughput / RAP alone's, c=8",
                    r["throughput_vs_rap_alone"],
                    ">= 0.95",
                    r["throughput_vs_rap_alone"] >= 0.95,
                )
            )
    errors = sum(r["errors"] + r["lost"] for r in rows)
    out.append(_target("errors + lost, every row", errors, "0", errors == 0))
    return out


def _present(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    """The optional columns some row has (a reader bundle's)."""
    return [c for c in columns if any(c in r for r in rows)]


def _target(what: str, measured, goal: str, met: bool) -> dict:
    return {"target": what, "measured": measured, "goal": goal, "met": "yes" if met else "NO"}


def markdown(result: dict, args) -> str:
    ratio_cols = [
        "server",
        "backend",
        "concurrency",
        "protect_share",
        "throughput_vs_bare",
        "p50_vs_bare",
        "p99_vs_bare",
        "cpu_vs_bare_1p",
        "throughput_vs_naive",
        "cpu_vs_naive",
        "throughput_vs_rap_alone",
        "cpu_vs_rap_alone",
    ]
    m, peak, settings = result["machine"], result["fp32_peak"], result["settings"]
    parts = [
        "# Serving benchmark: the guard vs its own bare mode vs a naive server\n\n",
        f"Closed-loop clients on loopback (one process, separate from every server); all servers up at once and "
        f"measured interleaved, {args.rounds} rounds x {args.seconds:g} s per point (after {args.warmup:g} s "
        f"warm-up each), backend threads {args.threads}, SST-2 test sentences, POST /v1/classify. bare = `guard "
        "serve --detectors none` on the same graph; naive = a transformers pipeline in FastAPI on torch's pool of "
        f"{args.threads} threads (torch) or on one (torch-1t); every ratio to naive takes the better naive row. "
        "cpu_ms_per_request = the server process's utime + stime over "
        "the measured windows / requests answered. padded_token_share = padding / tokens sent to the backend. "
        f"Whole run {settings['wall_seconds']:g} s; the client used {settings['client_cpu_seconds']:g} CPU-s.\n\n",
        "## Targets\n\n",
        markdown_table(result["targets"], ["target", "measured", "goal", "met"]),
        "\n## Points\n\n",
        markdown_table(result["rows"], COLUMNS),
        "\n## Ratios\n\n",
        markdown_table(
            result["ratios"], ratio_cols + _present(result["ratios"], ("throughput_vs_default", "cpu_vs_default"))
        ),
        f"\n## Raw backends (no server) vs the fp32 peak\n\nPeak {peak['gflops']:g} GFLOP/s on {peak['cores']} "
        f"cores ({peak['how']}); a 1024^3 fp32 matrix product (numpy) reaches {peak['sgemm_gflops']:g} GFLOP/s "
        "here. FLOPs counted on padded rows; int8 graphs at the same (fp32-equivalent) FLOPs.\n\n",
        markdown_table(
            result["raw_backends"],
            ["backend", "batch", "rows", "ms_per_row", "gflops", "share_of_peak", "share_of_sgemm"],
        ),
    ]
    graphs = result.get("graphs")
    if graphs:
        parts.append(_graphs_markdown(graphs))
    parts.append(
        f"\nMachine: {m['cpu']} x{m['cpu_count']}, " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + "\n"
    )
    return "".join(parts)


def _graphs_markdown(graphs: dict) -> str:
    evaluation = graphs["evaluation"]
    rows = [{"backend": b, **v} for b, v in evaluation.items() if b != "int8_verdict"]
    verdicts = "".join(
        f"- **{b}**: {'recommended' if v['recommended'] else 'not recommended'} ({v['reason']})\n"
        for b, v in evaluation["int8_verdict"].items()
    )
    return (
        f"\n## Graphs and what int8 does to the guard\n\nFused operators of model.opt.onnx: "
        f"{graphs['fused_operators']}; parity with torch {graphs['optimized_parity_max_prob_diff']:.1e}. "
        f"Held-out rows for the int8 thresholds: {graphs['held_out_rows']}; prediction agreement with fp32: "
        f"{graphs['agreement_with_fp32']}. SST-2 test and its poisoned copy, each graph at its own thresholds:\n\n"
        + markdown_table(rows, ["backend", "frr_target", "cacc", "asr", "frr", "far"])
        + "\n"
        + verdicts
    )
