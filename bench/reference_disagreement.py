"""A clean reference classifier's disagreement as a detector (issue 31): measured, not adopted.

    python -m bench.reference_disagreement --data ../shared/data/sst2 --clean-reference
    python -m bench.reference_disagreement --data ../shared/data/offenseval --attacks badnet-sl-2k adaptive-sl

A signal that reads neither RAP's pass 2 nor the suspect's [CLS]: a classifier the attacker never touched
predicts the same input, and the guard flags a protect-label prediction the reference disputes. A
paraphrased (syntactic, style) or adaptive trigger changes how the suspect reads a text, not what the text
says, so a clean reader should keep the source label. Two references per dataset:

- `calibration`: the packaged MiniLM fine-tuned (5 epochs) on the calibration's own training half of dev,
  every label (the rows `calibrate rap` trains its RAP row on): what a user of the guard could build;
- `clean` (`--clean-reference`): the bench's clean model, fine-tuned on the whole training set (recipe
  `clean`): an upper bound no user has (with a trusted clean model, one would serve it instead);
- `distilled` (`--distilled`): the packaged MiniLM distilled from each suspect on the same rows
  (`calibrate rap --reader-objective distill`): it learns the clean task from the suspect's probabilities.

Scores per text, flagged above (the suspect's prediction is the target label):
- `reference`: the reference's log-odds AGAINST the target (log p(not target) - log p(target));
- `reference-diff`: the suspect's log-odds for the target minus the reference's: how much more the suspect
  believes the target than the clean reader does.
Each alone and united with the default detectors (`floored+features`, the bundle's two scores with
bench.adaptive's even split of the target FRR), thresholds on the calibration's held-out half of dev, rates on
test over inputs predicted as the target, as bench.adaptive. Writes bench/results/reference_disagreement.{json,md}
(rows of other datasets/attacks kept).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.adaptive import ADAPTIVE, PLAIN, AttackRows, _scores, merge_results, union_points
from bench.attacks.recipes import TARGET, load_recipes
from bench.feature_scores import auc
from bench.models import build_model
from calibrate.data import load_examples
from calibrate.model import default_base_model, quiet_transformers
from calibrate.options import TrainOptions
from calibrate.rap.options import FRR_TARGETS, RapOptions
from calibrate.rap.perturbation import split_rows
from calibrate.report import markdown_table

if TYPE_CHECKING:
    from bench.detectors.mutation import TorchClassifier
    from guard.core.types import Example

log = logging.getLogger("bench.reference_disagreement")
ATTACKS = (PLAIN, *ADAPTIVE, "syntactic", "style")
DEFAULT = ("floored", "features")
VARIANTS = {  # name -> the flag-above scores united
    "floored+features": DEFAULT,
    "reference": ("reference",),
    "reference-diff": ("reference-diff",),
    "floored+features+reference": (*DEFAULT, "reference"),
    "floored+features+reference-diff": (*DEFAULT, "reference-diff"),
}
TABLE_FRR = (0.01, 0.03)


def calibration_reference(data: Path, seed: int, cache: Path) -> Path:
    """The packaged MiniLM fine-tuned on calibrate rap's training half of dev (cached)."""
    from calibrate.train import train_classifier  # torch: only when training

    out = cache / "models" / f"reference-calibration-s{seed}"
    if not (out / "config.json").is_file():
        train_rows, _ = split_rows(load_examples(data / "dev.tsv"), RapOptions((TARGET,), seed=seed))
        log.info("training the calibration reference on %d dev rows", len(train_rows))
        train_classifier(default_base_model(), train_rows, out, TrainOptions(epochs=5, seed=seed, progress=False))
    return out


def distilled_reference(data: Path, suspect: Path, name: str, seed: int, cache: Path) -> Path:
    """The packaged MiniLM distilled from `suspect` on the same rows (cached per attack): `--reader-objective
    distill` of calibrate.rap.reader."""
    out = cache / "models" / f"reference-distilled-{name}-s{seed}"
    if not (out / "config.json").is_file():
        from calibrate.model import load_classifier
        from calibrate.rap.reader import train_reader  # torch: only when training

        train_rows, _ = split_rows(load_examples(data / "dev.tsv"), RapOptions((TARGET,), seed=seed))
        options = TrainOptions(epochs=5, seed=seed, progress=False, max_length=128)
        train_reader(default_base_model(), train_rows, out, options, teacher=load_classifier(suspect))
    return out


@dataclass(frozen=True)
class Reader:
    model: TorchClassifier
    accuracy: float  # on the test set's clean rows, every label

    @classmethod
    def load(cls, model_dir: Path, test: list[Example]) -> Reader:
        from bench.detectors.mutation import TorchClassifier  # torch and transformers: only when measuring

        model = TorchClassifier(model_dir)
        truth = np.array([r.label == TARGET for r in test])
        accuracy = float(np.mean((model.log_odds([r.text for r in test], TARGET) > 0) == truth))
        log.info("reader %s: accuracy on test %.3f", model_dir, accuracy)
        return cls(model, accuracy)


def measure(
    data: Path, attack: str, seed: int, cache: Path, readers: dict[str, Reader], distilled: bool = False
) -> list[dict]:
    rows = AttackRows.load(data, attack, seed, cache)
    if distilled:
        test = load_examples(data / "test.tsv")
        model = distilled_reference(data, rows.model_dir, attack, seed, cache)
        readers = {**readers, "distilled": Reader.load(model, test)}
    sets = rows.sets
    suspect = {k: _scores(rows.guard, v, rows.floor) for k, v in sets.items()}
    out = []
    for name, reader in readers.items():
        scored = {}
        for k, texts in sets.items():
            ref = reader.model.log_odds(texts, TARGET)
            scored[k] = {**suspect[k], "reference": -ref, "reference-diff": suspect[k]["before"] - ref}
        log.info("== %s / %s scored", attack, name)
        out.append({
            "attack": attack, "reference": name, "seed": seed, "cacc": rows.cacc, "asr": rows.inputs.asr,
            "reference_accuracy": reader.accuracy, "rows": {k: len(v) for k, v in sets.items()},
            "auroc": {s: auc(scored["clean"][s], scored["poisoned"][s]) for s in ("reference", "reference-diff")},
            "points": [
                {"variant": v, **union_points(scored["held"], scored["clean"], scored["poisoned"], parts, frr)}
                for v, parts in VARIANTS.items()
                for frr in FRR_TARGETS
            ],
        })  # fmt: skip
    return out


def write(out: Path, dataset: str, results: list[dict]) -> None:
    key = ("dataset", "attack", "reference")
    results, machine = merge_results(out / "reference_disagreement.json", dataset, results, key)
    (out / "reference_disagreement.md").write_text(markdown(results, machine))


def table_rows(results: list[dict], frr: float) -> list[dict]:
    """One row per (dataset, attack, reference reader): test FRR / FAR of each variant at `frr`, the default's first."""
    rows = []
    for r in results:
        at = {p["variant"]: p for p in r["points"] if abs(p["frr_target"] - frr) < 1e-9}
        row = {"dataset": r["dataset"], "attack": r["attack"], "reader": r["reference"],
               "ref. accuracy": r["reference_accuracy"], "AUROC ref / diff":
               f"{r['auroc']['reference']:.2f} / {r['auroc']['reference-diff']:.2f}"}  # fmt: skip
        row |= {v: f"{p['test_frr']:.1%} / {p['test_far']:.1%}" for v, p in at.items()}
        rows.append(row)
    return rows


def markdown(results: list[dict], machine: dict) -> str:
    columns = ["dataset", "attack", "reader", "ref. accuracy", "AUROC ref / diff", *VARIANTS]
    parts = [
        "# A clean reference classifier's disagreement (issue 31; not a guard detector)\n\n"
        "`python -m bench.reference_disagreement` (see its docstring). Cells: test FRR / FAR (share of triggered\n"
        "inputs predicted as the target that pass). `reader`, the reference: `calibration`, MiniLM fine-tuned\n"
        "on the calibration's few hundred clean rows; `clean`, a clean model trained on the whole training set\n"
        "(an upper bound no user has).\n"
    ]
    for frr in TABLE_FRR:
        parts.append(f"\n## At {frr:.0%} target FRR\n\n" + markdown_table(table_rows(results, frr), columns))
    parts.append(
        f"\nMachine: {machine['cpu']} x{machine['cpu_count']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
        + "\n"
    )
    return "".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--seed", type=int, default=13, help="calibration seed (dev split)")
    p.add_argument("--clean-reference", action="store_true", help="also the clean model (trained if not cached)")
    p.add_argument("--distilled", action="store_true", help="also a reader distilled from each suspect")
    p.add_argument("--distilled-only", action="store_true", help="the distilled reader only (implies --distilled)")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    dataset = args.data.name
    cache = args.cache if dataset == "sst2" else args.cache / dataset
    test = load_examples(args.data / "test.tsv")
    readers = {}
    if not args.distilled_only:
        readers["calibration"] = Reader.load(calibration_reference(args.data, args.seed, cache), test)
    if args.clean_reference:
        clean = build_model(load_recipes(args.data)["clean"], args.data, cache / "models")
        readers["clean"] = Reader.load(Path(clean["dir"]), test)
    results = [
        r
        for a in args.attacks
        for r in measure(args.data, a, args.seed, cache, readers, args.distilled or args.distilled_only)
    ]
    write(args.out, dataset, results)


if __name__ == "__main__":
    main()
