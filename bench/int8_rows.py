"""Does an int8 row's verdict depend on its batch-mates? Batched vs row at a time, on one int8 bundle (issue 30).

    python -m bench.int8_rows --bundle bench/.cache/bundles/badnet-sl-int8-s13 --data ../shared/data/sst2

Dynamic int8 (`calibrate rap --int8`) quantises activations with one scale per run: the whole batch
tensor, padding included. Run on whole batches, a row's logits, and so its scores, move with whatever
it is batched with; the ONNX backend now runs int8 graphs one row at a time on the row's own tokens
(guard.core.backends.base.ROW_AT_A_TIME_GRAPHS). For each way of running the int8 graph (and the fp32
graph as the control) this scores the same test texts (clean and triggered) in three orders: the file's,
and two seeded shuffles, through the offline checker (batches of 32, as `guard check` and
`calibrate evaluate` run), at the bundle's own thresholds for that graph, and reports:

- how far a row's RAP and feature scores move between orders (max and 99th percentile);
- how many verdicts change between orders (flagged in one order, allowed in another);
- FRR and FAR per order (clean rows flagged; triggered rows let through);
- CPU seconds per 1,000 texts of this process (both passes), side by side as a ratio to batched int8.

Writes bench/results/int8_rows.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from bench.attacks.recipes import TARGET, load_recipes
from bench.machine import machine_info
from calibrate.data import load_examples
from calibrate.report import markdown_table
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle
from guard.core.checker import Checker
from guard.core.detection import first_windows

ORDERS = ("file", "shuffle-0", "shuffle-1")
MODES = {  # name -> (backend, row at a time)
    "fp32 batched": ("onnx", False),
    "int8 batched (before)": ("onnx-int8", False),
    "int8 row at a time (now)": ("onnx-int8", True),
}


def _ordered(texts: list[str], order: str) -> list[int]:
    index = list(range(len(texts)))
    if order != "file":
        random.Random(int(order.rsplit("-", 1)[1])).shuffle(index)
    return index


def run_mode(bundle: Path, backend_name: str, row_at_a_time: bool, clean: list[str], triggered: list[str]) -> dict:
    loaded = load_bundle(bundle)
    backend = load_backend(backend_name, loaded.path)
    backend.row_at_a_time = row_at_a_time  # the graph's own batching (before) or the backend's rule (now)
    checker = Checker.for_bundle(loaded, backend)
    texts = clean + triggered
    scores, flags, cpu = [], [], 0.0
    for order in ORDERS:
        index = _ordered(texts, order)
        started = time.process_time()
        rows = checker.scores([texts[i] for i in index])
        cpu += time.process_time() - started
        verdicts = checker.two_pass.verdicts(rows)
        back = np.argsort(index)  # results in the file's order again
        first = first_windows(rows.owner)
        scores.append({"rap": rows.rap[first][back], "features": rows.features[first][back]})
        flags.append(np.array([v.flagged for v in verdicts])[back])
    backend.close()
    flags_arr = np.array(flags)
    n = len(clean)
    out = {
        "changed_verdicts": int(np.any(flags_arr != flags_arr[0], axis=0).sum()),
        "cpu_s_per_1000": round(1000 * cpu / (len(ORDERS) * len(texts)), 3),
        "per_order": [
            {"order": o, "frr": float(f[:n].mean()), "far": float(1 - f[n:].mean()) if len(triggered) else None}
            for o, f in zip(ORDERS, flags, strict=True)
        ],
    }
    for name in ("rap", "features"):
        stacked = np.array([s[name] for s in scores], dtype=np.float64)
        live = ~np.isnan(stacked).any(axis=0)
        spread = np.ptp(stacked[:, live], axis=0) if live.any() else np.zeros(1)
        out[f"{name}_spread_max"] = float(spread.max())
        out[f"{name}_spread_p99"] = float(np.quantile(spread, 0.99))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle calibrated with --int8")
    p.add_argument("--data", type=Path, required=True, help="dataset folder (test.tsv)")
    p.add_argument("--attack", default="badnet-sl", help="the recipe whose trigger makes the triggered rows")
    p.add_argument("--rows", type=int, default=600, help="clean test rows (and as many triggered ones at most)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    test = load_examples(args.data / "test.tsv")
    clean = [r.text for r in test[: args.rows]]
    triggered = [r.text for r in load_recipes(args.data)[args.attack].poison_test(test) if r.label != TARGET]
    triggered = triggered[: args.rows]
    rows = []
    for mode, (backend, row_at_a_time) in MODES.items():
        print(f"== {mode}", flush=True)
        rows.append({"mode": mode, **run_mode(args.bundle, backend, row_at_a_time, clean, triggered)})
    base = next(r for r in rows if r["mode"] == "int8 batched (before)")["cpu_s_per_1000"]
    for r in rows:
        r["cpu_vs_int8_batched"] = round(r["cpu_s_per_1000"] / base, 3)
    result = {
        "machine": machine_info(),
        "bundle": str(args.bundle),
        "attack": args.attack,
        "clean_rows": len(clean),
        "triggered_rows": len(triggered),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_rows.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "int8_rows.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    table = []
    for r in result["rows"]:
        frr = ", ".join(f"{o['frr']:.2%}" for o in r["per_order"])
        far = ", ".join(f"{o['far']:.2%}" for o in r["per_order"] if o["far"] is not None)
        table.append({"mode": r["mode"], "changed verdicts": r["changed_verdicts"],
                      "rap spread max / p99": f"{r['rap_spread_max']:.3g} / {r['rap_spread_p99']:.3g}",
                      "features spread max / p99": f"{r['features_spread_max']:.3g} / {r['features_spread_p99']:.3g}",
                      "FRR per order": frr, "FAR per order": far, "CPU s / 1,000 texts": r["cpu_s_per_1000"],
                      "CPU vs int8 batched": r["cpu_vs_int8_batched"]})  # fmt: skip
    machine = result["machine"]
    return (
        "# int8: a row's verdict whatever its batch-mates (issue 30)\n\n"
        f"Bundle `{result['bundle']}`; {result['clean_rows']} clean and {result['triggered_rows']} triggered "
        f"({result['attack']}) SST-2 test texts, each scored in {len(ORDERS)} orders (the file's, two seeded "
        "shuffles) in batches of 32 through the offline checker, at the bundle's own thresholds for the graph. "
        "`changed verdicts`: texts flagged in one order and allowed in another; spread: the largest change of a "
        "text's score between orders. `python -m bench.int8_rows` (see its docstring).\n\n"
        + markdown_table(table, list(table[0]))
        + f"\nMachine: {machine['cpu']} x{machine['cpu_count']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
        + "\n"
    )


if __name__ == "__main__":
    main()
