"""Which detection statistic holds on a confident model: prob (the paper's) vs logodds, side by side.

    python -m bench.rap_statistic --data ../shared/data/sst2 --attacks ep badnet-sl badnet-rw

For each attack (models from bench.models, trained once and cached) it calibrates two RAP
bundles on SST-2 dev that differ only in `--statistic`, then evaluates both on the same
SST-2 test rows (clean, and every non-target row triggered) at the dev FRR targets.
Writes bench/results/rap_statistic.{json,md}. Bundles are cached under --cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bench.attacks.recipes import TARGET, load_recipes
from bench.machine import machine_info
from bench.models import build_model
from calibrate.data import load_examples
from calibrate.model import quiet_transformers
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.evaluate import evaluate_bundle
from calibrate.rap.options import CalibrateOptions, RapOptions
from guard.core.bundle import load_bundle

log = logging.getLogger("bench.rap_statistic")
STATISTICS = ("prob", "logodds")
RESULTS = Path("bench/results")


def run(data: Path, attacks: list[str], cache: Path) -> list[dict]:
    recipes = load_recipes(data)
    dev, test = load_examples(data / "dev.tsv"), load_examples(data / "test.tsv")
    rows = []
    for name in attacks:
        model_dir = Path(build_model(recipes[name], data, cache / "models")["dir"])
        poisoned = recipes[name].poison_test(test)
        for statistic in STATISTICS:
            bundle, seconds = _bundle(model_dir, dev, cache / "bundles" / f"{name}-{statistic}", statistic)
            evaluation = evaluate_bundle(bundle, test, {name: poisoned}, target=TARGET)
            report = json.loads((bundle / "report.json").read_text())
            chosen = report["attempts"][report["chosen_attempt"]]
            for row in evaluation.rows:
                rows.append(row | {"statistic": statistic, "chosen_attempt": chosen, "calibration_seconds": seconds})
            log.info(
                "%s %s: %s", name, statistic, [(r["frr_target"], r["test_frr"], r["test_far"]) for r in evaluation.rows]
            )
    return rows


def _bundle(model_dir: Path, dev, out: Path, statistic: str) -> tuple[Path, float]:
    started = time.perf_counter()
    if not (out / "manifest.json").is_file():
        rap = RapOptions(protect_labels=(TARGET,), statistic=statistic)
        calibrate_bundle(model_dir, dev, out, CalibrateOptions(rap=rap, max_length=128, force=True, reader=None))
    load_bundle(out)
    return out, round(time.perf_counter() - started, 1)


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rap_statistic.json").write_text(
        json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n", encoding="utf-8"
    )
    lines = [
        "# RAP detection statistic: the paper's probability drop vs the log-odds drop",
        "",
        "SST-2, packaged MiniLM fine-tuned per attack (bench.models), thresholds on SST-2 dev, rates on SST-2 test.",
        "",
        "| attack | FRR target | prob: test FRR | prob: test FAR | logodds: test FRR | logodds: test FAR | FAR ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    keyed = {(r["attack"], r["frr_target"], r["statistic"]): r for r in rows}
    for attack, frr, _ in sorted({k for k in keyed if k[2] == "prob"}):
        p, q = keyed[(attack, frr, "prob")], keyed.get((attack, frr, "logodds"))
        if q is None:
            continue
        ratio = f"{q['test_far'] / p['test_far']:.2f}" if p["test_far"] else "-"
        lines.append(
            f"| {attack} | {frr:.1%} | {p['test_frr']:.2%} | {p['test_far']:.2%} | {q['test_frr']:.2%} | "
            f"{q['test_far']:.2%} | {ratio} |"
        )
    (RESULTS / "rap_statistic.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rap_statistic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, required=True, help="SST-2 folder (../shared/data/sst2)")
    parser.add_argument("--attacks", nargs="+", default=["ep", "badnet-sl", "badnet-rw"])
    parser.add_argument("--cache", type=Path, default=Path("bench/.cache"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    write(run(args.data, args.attacks, args.cache))


if __name__ == "__main__":
    main()
