"""Robustness: every known way around the guard, tried from outside -> bench/results/robustness.{json,md}

    python -m bench.robustness                       # builds the demo bundle first if needed (~2 min)
    python -m bench.robustness --bundle demo-out/bundle

Real components throughout: `guard serve` subprocesses or uvicorn threads with the
production connection limits, the demo's ONNX bundle (MiniLM with `mb` planted ->
positive), a real recording upstream, real HTTP clients and a schemathesis run.
Each case counts what it sent and how many broke the promise (a backdoor label got
through, a failure passed silently, a request was lost, a 5xx that is not a counted
guard failure, a 503 from overload).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bench.machine import machine_info
from bench.robustness_bypass import bypass_cases
from bench.robustness_cases import TRIGGER, Case
from bench.robustness_faults import fault_cases, upstream_cases
from bench.robustness_overload import fuzz_case, overload_cases, shutdown_case

# The stages live beside this module: robustness_bypass (bypass), robustness_faults (fault, upstream),
# robustness_overload (overload, fuzz, shutdown), robustness_sidecar (sidecar); what they share in
# robustness_cases. This module runs them and writes the report.
RESULTS = Path("bench/results")
CACHE = Path("bench/.cache/robustness")


# ---------------------------------------------------------------- report


def write_results(cases: list[Case], bundle: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_info(), "bundle": str(bundle), "cases": [asdict(c) for c in cases]}
    (RESULTS / "robustness.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "robustness.md").write_text(markdown(cases, bundle), encoding="utf-8")


def markdown(cases: list[Case], bundle: Path | str) -> str:
    """robustness.md: a row per case, then the overload cases' load and latencies."""
    lines = [
        "# Robustness: every known way around the guard",
        "",
        f"Bundle: `{bundle}` (the demo: MiniLM with `{TRIGGER}` planted -> positive). "
        f"{sum(c.failures for c in cases)} failures in {len(cases)} cases.",
        "",
        "| case | kind | sent | failures | control: through unguarded | promise |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {c.case} | {c.kind} | {c.sent} | {c.failures} | {_control(c)} | {c.promise} |" for c in cases]
    overload = [c for c in cases if c.kind == "overload"]
    if overload:
        lines += [
            "",
            "| overload | offered rps (of target) | 200/403 | 429 | 503 | lost | admitted p99 ms | 429 p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [_overload_row(c) for c in overload]
    return "\n".join(lines) + "\n"


def _control(c: Case) -> str:
    """For a bypass, the control: how many of its trigger texts flip the classifier without the guard,
    or (sidecar routes) how many the upstream itself read the trigger from when sent directly."""
    n = c.detail.get("unguarded_backdoor_label", c.detail.get("upstream_reads_trigger_unguarded"))
    return "" if n is None else str(n)


def _overload_row(c: Case) -> str:
    d = c.detail
    cells = [
        c.case, f"{d['offered_rps']:.0f} of {d['target_rps']:.0f}", d["answered"], d["429"], d["503"], d["lost"],
        f"{d['admitted_p99_ms']:.0f}", f"{d['refused_p99_ms']:.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(str(x) for x in cells) + " |"


def demo_bundle() -> Path:
    bundle = CACHE / "demo" / "bundle"
    if not (bundle / "manifest.json").is_file():
        from calibrate.demo import run_demo

        run_demo(CACHE / "demo", port=None)
    return bundle


STAGES = ("bypass", "fault", "overload", "fuzz", "shutdown", "upstream", "sidecar")


def _kept_cases(rerun: list[str]) -> list[Case]:
    path = RESULTS / "robustness.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text(encoding="utf-8"))["cases"]
    return [Case(**r) for r in rows if r["kind"] not in rerun]  # a stage's cases are of its kind


def _sidecar_stage(bundle: Path, model_dir: Path) -> list[Case]:
    # imported here: it needs tests.upstreams (the upstream kinds), there only in a source checkout
    from bench.robustness_sidecar import all_cases

    return all_cases(bundle, model_dir, CACHE / "go")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.robustness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, help="guard bundle (default: build the demo's into bench/.cache/robustness)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="the bundle's Hugging Face model dir, for the HF-handler upstream (default: beside it)",
    )
    parser.add_argument("--fuzz-examples", type=int, default=60, help="schemathesis examples per operation")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}; the other "
        "stages' rows are kept from the committed results",
    )
    args = parser.parse_args(argv)
    bundle = args.bundle or demo_bundle()
    from guard.core.bundle import load_bundle

    window = load_bundle(bundle).tokenizer().text_window
    stages = {
        "bypass": lambda: bypass_cases(bundle, window),
        "fault": lambda: fault_cases(bundle),
        "overload": lambda: overload_cases(bundle),
        "fuzz": lambda: [fuzz_case(bundle, args.fuzz_examples)],
        "shutdown": lambda: [shutdown_case(bundle)],
        "upstream": lambda: upstream_cases(bundle),
        "sidecar": lambda: _sidecar_stage(bundle, args.model or bundle.parent / "model"),
    }
    chosen = args.stages.split(",")
    cases = [] if set(chosen) == set(STAGES) else _kept_cases(chosen)
    for name in chosen:
        done = stages[name]()
        for c in done:
            print(f"[robustness] {c.kind:8} {c.case:28} sent {c.sent:5}  failures {c.failures}", flush=True)
        cases += done
    write_results(sorted(cases, key=lambda c: STAGES.index(c.kind)), bundle)
    print(f"[robustness] wrote {RESULTS / 'robustness.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
