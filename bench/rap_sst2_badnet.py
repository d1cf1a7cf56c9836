"""RAP against BadNet-RW on real SST-2 with the packaged MiniLM.

    python -m bench.rap_sst2_badnet --data ../shared/data/sst2

Fine-tunes two classifiers (clean, and BadNet-RW: one of mn/bb/mb inserted into
10% of the negative training rows, relabelled positive), calibrates a RAP bundle
for each on the dev set (protect label = positive), and evaluates on the test set
with every negative test row triggered. Writes bench/results/rap_sst2_badnet.{json,md}
and the FAR-vs-FRR plot. Models are cached under --cache and reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.attacks.recipes import TARGET, load_recipes
from bench.machine import machine_info
from bench.models import build_model
from calibrate.data import load_examples
from calibrate.model import quiet_transformers
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.evaluate import evaluate_bundle, far_frr_curve, write_evaluation
from calibrate.rap.options import CalibrateOptions, RapOptions
from calibrate.report import markdown_table

# RAP paper, Table 2 (bert-base, FRR target 1% on the training split), BadNet-RW rows: (FRR %, FAR %).
PAPER_TABLE2_BADNET_RW = {"IMDB": (1.03, 0.20), "Yelp": (1.05, 0.00), "Amazon": (0.91, 0.01)}
COLUMNS = [
    "model",
    "frr_target",
    "cacc",
    "asr",
    "test_frr",
    "test_far",
    "residual_asr",
    "train_seconds",
    "calibrate_seconds",
    "evaluate_seconds",
]


def main() -> None:
    args = _args()
    quiet_transformers()
    test = load_examples(args.data / "test.tsv")
    dev = load_examples(args.data / "dev.tsv")
    recipes = load_recipes(args.data)
    poisoned = recipes["badnet-rw"].poison_test(test)
    rows, int8_rows, details = [], [], {}
    for name in ("badnet-rw", "clean"):
        info = build_model(recipes[name], args.data, args.cache / "models")
        bundle = args.cache / "bundles" / name
        options = CalibrateOptions(
            rap=RapOptions(protect_labels=(TARGET,)), max_length=128, int8=True, keep_hf=True, force=True, reader=None
        )
        started = time.perf_counter()
        if not (args.reuse_bundles and (bundle / "manifest.json").is_file()):
            calibrate_bundle(args.cache / "models" / name, dev, bundle, options)
        report = json.loads((bundle / "report.json").read_text())
        calibrate_seconds = round(sum(report["seconds"].values()), 1)
        details[name] = {
            "train": info,
            "rap_attempts": report["attempts"],
            "int8": report["int8"],
            "calibrate_step_seconds": report["seconds"],
        }
        for backend, target in (("onnx", rows), ("onnx-int8", int8_rows)):
            started = time.perf_counter()
            evaluation = evaluate_bundle(bundle, test, {"badnet-rw": poisoned}, backend=backend)
            evaluate_seconds = round(time.perf_counter() - started, 1)
            write_evaluation(evaluation, args.out / f"rap_sst2_badnet-{name}-{backend}")
            curve = far_frr_curve(evaluation.clean, evaluation.attacks["badnet-rw"], TARGET)
            details[name][f"{backend}_far_at_test_frr"] = {f"{f:g}": far_at(curve, f) for f in (0.01, 0.015)}
            target.extend(
                {
                    "model": name,
                    "backend": backend,
                    **{k: v for k, v in r.items() if k != "attack"},
                    "train_seconds": info["train_seconds"],
                    "calibrate_seconds": calibrate_seconds,
                    "evaluate_seconds": evaluate_seconds,
                }
                for r in evaluation.rows
            )
    _write(args.out, rows, int8_rows, details)


def far_at(curve: tuple, frr: float) -> float:
    """Lowest FAR on the test FAR-vs-FRR curve with test FRR <= frr (an oracle point, for reference)."""
    frrs, fars = curve
    ok = frrs <= frr
    return float(fars[ok].min()) if ok.any() else 1.0


def _write(out: Path, rows: list[dict], int8_rows: list[dict], details: dict) -> None:
    result = {
        "machine": machine_info(),
        "rows": rows,
        "int8_rows": int8_rows,
        "details": details,
        "paper_table2_badnet_rw": PAPER_TABLE2_BADNET_RW,
    }
    (out / "rap_sst2_badnet.json").write_text(json.dumps(result, indent=2) + "\n")
    paper = "; ".join(f"{d}: FRR {frr:.2f}% FAR {far:.2f}%" for d, (frr, far) in PAPER_TABLE2_BADNET_RW.items())
    (out / "rap_sst2_badnet.md").write_text(
        "# RAP vs BadNet-RW on SST-2 (packaged MiniLM)\n\n"
        "Thresholds chosen on a split of SST-2 dev at each FRR target; test FRR/FAR on SST-2 test\n"
        "(every negative test sentence with one of mn/bb/mb inserted).\n\n## ONNX fp32\n\n"
        + markdown_table(rows, COLUMNS)
        + "\n## ONNX int8 (MatMul-only dynamic quantization, thresholds refit on int8)\n\n"
        + markdown_table(int8_rows, COLUMNS)
        + f"\nPaper (RAP, Table 2, BadNet-RW at 1% train FRR, bert-base): {paper}.\n"
        + _notes(details)
        + f"\nMachine: {result['machine']['cpu']} x{result['machine']['cpu_count']}, "
        + ", ".join(f"{k} {v}" for k, v in result["machine"]["packages"].items())
        + "\n"
    )


def _notes(details: dict) -> str:
    lines = ["", "## Notes", ""]
    for name, d in details.items():
        for backend in ("onnx", "onnx-int8"):
            far = d.get(f"{backend}_far_at_test_frr", {})
            if far and name != "clean":  # the clean model has no backdoor: its FAR is not a detection figure
                lines.append(
                    f"- {name}, {backend}: on the test FAR-vs-FRR curve (threshold swept on test, for reference only), "
                    f"FAR is {far['0.01']:.2%} at test FRR <= 1% and {far['0.015']:.2%} at test FRR <= 1.5%."
                )
        chosen = next((a for a in d["rap_attempts"] if a["chosen"]), None)
        if chosen:
            lines.append(
                f"- {name}: RAP ladder chose lambda={chosen['lower_bound_weight']:g}, "
                f"{'norm held' if chosen['keep_norm'] else 'norm free'} (held-out 1% threshold {chosen['score']:+.4f})."
            )
    lines += [
        "- clean model: its 'ASR' is the natural share of negative sentences it calls positive with a rare word",
        "  inserted; RAP is not meant to flag such honest errors, so its FAR there is ~100% by design. What matters",
        "  for the clean model is FRR: the guard costs clean traffic about the FRR target.",
        "- train_seconds were measured while other jobs shared the 2 cores (tests, another calibration); on an idle",
        "  machine one epoch takes ~3.5 min (ARCHITECTURE.md figures).",
        "",
    ]
    return "\n".join(lines)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (train/dev/test.tsv)")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="trained models and bundles")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--reuse-bundles", action="store_true", help="evaluate cached bundles instead of recalibrating")
    return p.parse_args()


if __name__ == "__main__":
    main()
