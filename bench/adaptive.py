"""RAP statistics that do not assume the trigger is robust, on the plain and the adaptive attack (issue 31).

    python -m bench.adaptive --data ../shared/data/sst2 --seed 13   # the twin and the three adaptive attacks

The adaptive attackers (bench/attacks/adaptive.py) train their backdoor to switch OFF when a rare token
is inserted (under RAP's pass 2 the triggered inputs move MORE than clean ones), to keep clean-looking
[CLS] features, or both. Per attack model (cached by bench.detection_matrix, whose default guard bundle
this reads) it scores, on the same rows, every statistic from the bundle's two passes:

- floored: the default statistic (guard.core.rap: minus the log-odds drop, counted from at least the
  label's floor), one-sided (flag above), as the guard serves it;
- perturbed: the default before it, logit p(y | x + RAP), flagged above;
- floored-2s: two-sided `floored`: also flags a drop too LARGE (the switch-off attackers' triggered inputs
  fall further than clean ones under pass 2), the target split over both tails;
- perturbed-2s: two-sided `perturbed`: flag above the upper OR below the lower threshold, the FRR target
  split evenly over the two tails of the clean held-out scores;
- drop-2s: the same on the log-odds drop (logit p(y|x+RAP) - logit p(y|x)): too small OR too large;
  `drop` alone: too small only (the triggered input barely moves, RAP's own idea, on the drop instead of the
  perturbed log-odds);
- *@band: the same statistics from a RAP row trained for a band chosen from the model's own clean
  confidence (`band_for`: the band's top is the 10th percentile of the clean training rows' log-odds,
  its bottom half of that) instead of the fixed [2, 4] nats;
- features, and unions `A+B`: flagged when any part flags, the target split evenly over the parts;
- mutation (BDMMT, bench/detectors/mutation.py): how far the target's log-odds falls from the attack model to
  the mean of K Gaussian mutants of its weights (`--mutants`, `--mutation-scale`); `mutation` flags a large
  fall, `mutation-low` a small one (BDMMT's side: triggered inputs keep their label), `mutation-2s` both, and
  `floored+features+mutation-2s` the default detectors with both. Cost: K + 1 torch forward passes per scored
  text (the model and its K mutants; a signal the bench measures, the guard does not serve it).

Thresholds are fitted on the calibration's own held-out half of dev (the rows `calibrate rap` fits on,
predicted as the target; guard.core.thresholds); rates on test (clean rows; every non-target row
triggered) over the inputs predicted as the target. Writes bench/results/adaptive.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.attacks.recipes import TARGET, load_recipes
from bench.detection_matrix import STATISTICS, _bundle, _inputs, guard_bundle_name, matrix_runs
from bench.detectors.classifier import Classifier
from bench.feature_scores import auc
from bench.machine import machine_info
from bench.models import build_model
from calibrate.data import load_examples
from calibrate.model import quiet_transformers
from calibrate.rap.options import FRR_TARGETS, RapOptions
from calibrate.rap.perturbation import split_rows
from calibrate.report import markdown_table
from guard.core import rap, thresholds
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle
from guard.core.checker import Checker
from guard.core.detection import first_windows

if TYPE_CHECKING:
    from bench.detectors.mutation import MutationScorer
    from bench.detectors.runs import Inputs
    from guard.core.types import Example

log = logging.getLogger("bench.adaptive")
HEADLINE_FRR = 0.01
BASELINE = "floored+features"  # the default detectors: FAR ratios are to this row
SERVED = ("rap", "features", "rap+features")  # the matrix's rows of the guard's default bundle
PLAIN = "badnet-sl-2k"  # the plain twin each adaptive attack is measured beside
ADAPTIVE = ("adaptive-sl", "adaptive-cls", "adaptive-both", "adaptive-init")
VARIANTS = {  # name -> the flag-above scores united (see `_scores`)
    "floored": ("floored",),
    "floored-2s": ("floored", "-floored"),
    "floored-2s+features": ("floored", "-floored", "features"),
    "perturbed": ("perturbed",),
    "perturbed-2s": ("perturbed", "-perturbed"),
    "drop-2s": ("drop", "-drop"),
    "drop": ("drop",),
    "drop+features": ("drop", "features"),
    "features": ("features",),
    "floored+features": ("floored", "features"),
    "perturbed+features": ("perturbed", "features"),
    "perturbed-2s+features": ("perturbed", "-perturbed", "features"),
    "drop-2s+features": ("drop", "-drop", "features"),
    "perturbed@band": ("band:perturbed",),
    "perturbed-2s@band": ("band:perturbed", "band:-perturbed"),
    "drop-2s@band": ("band:drop", "band:-drop"),
    "perturbed-2s@band+features": ("band:perturbed", "band:-perturbed", "features"),
    "drop-2s@band+features": ("band:drop", "band:-drop", "features"),
    "mutation": ("mutation",),
    "mutation-low": ("-mutation",),
    "mutation-2s": ("mutation", "-mutation"),
    "floored+features+mutation-2s": ("floored", "features", "mutation", "-mutation"),
}


def band_for(clean_logodds: np.ndarray, quantile: float = 0.10) -> tuple[float, float]:
    """A log-odds band from the model's own confidence: its top is the `quantile` of the clean rows'
    log-odds (so ~90% of them keep their label at the top of the band), its bottom half of that."""
    top = float(np.quantile(np.asarray(clean_logodds, dtype=np.float64), quantile))
    top = max(top, 0.2)
    return (round(top / 2, 3), round(top, 3))


def union_points(
    held: dict[str, np.ndarray], clean: dict[str, np.ndarray], poisoned: dict[str, np.ndarray], parts, frr: float
) -> dict:
    """Operating point of 'flag when any part's score is above its threshold', each at frr / len(parts)."""
    share = frr / len(parts)
    limits = {p: thresholds.threshold_at_frr(held[p], share) for p in parts}

    def flagged(scores: dict[str, np.ndarray]) -> np.ndarray:
        return np.any([scores[p] > limits[p] for p in parts], axis=0)

    return {
        "frr_target": frr,
        "held_frr": float(flagged(held).mean()),
        "test_frr": float(flagged(clean).mean()),
        "test_far": float(1.0 - flagged(poisoned).mean()) if len(poisoned[parts[0]]) else 0.0,
        "thresholds": {p: round(v, 4) for p, v in limits.items()},
    }


def _scores(bundle: Path, texts: list[str], floor: float, prefix: str = "") -> dict[str, np.ndarray]:
    """Per text (first window), from the bundle's two passes whatever its own statistic: `perturbed`, the
    log-odds `drop`, `floored` (from `floor`), `features`, and their negatives."""
    loaded = load_bundle(bundle)
    checker = Checker.for_bundle(loaded, load_backend("onnx", loaded.path))
    rows = checker.scores(texts)
    first = first_windows(rows.owner)
    before = rap.log_odds(rows.probs[first, TARGET])
    served = rows.rap[first]
    statistic = loaded.manifest.statistic
    if statistic == "floored":
        (label,) = [p for p in loaded.manifest.protect if p.label == TARGET]
        perturbed = served + np.maximum(before, label.floor)
    elif statistic == "perturbed":
        perturbed = served
    else:
        raise ValueError(f"{bundle}: statistic {statistic!r}; bench.adaptive reads floored or perturbed bundles")
    out = {"perturbed": perturbed, "drop": perturbed - before, "before": before}
    out["floored"] = perturbed - np.maximum(before, floor)
    if "features" in loaded.detectors:
        out["features"] = np.where(rows.token, np.inf, rows.features)[first]
    out["-perturbed"], out["-drop"], out["-floored"] = -out["perturbed"], -out["drop"], -out["floored"]
    return {f"{prefix}{k}": v for k, v in out.items()}


def _held_out(dev, seed: int, predicted_target: set[str]) -> tuple[list[str], list[str]]:
    """calibrate rap's split of dev: (training half rows of the target label, held-out half), each only rows
    the model predicts as the target."""
    train_rows, held_rows = split_rows(dev, RapOptions((TARGET,), seed=seed))
    train = [r.text for r in train_rows if r.label == TARGET and r.text in predicted_target]
    held = [r.text for r in held_rows if r.text in predicted_target]
    return train, held


def _mutation(scorer: MutationScorer, texts: list[str]) -> dict[str, np.ndarray]:
    """Per text: `mutation`, the fall of the target's log-odds over the mutants, and its negative."""
    fall = scorer.scores(texts, TARGET)
    return {"mutation": fall, "-mutation": -fall}


@dataclass(frozen=True)
class AttackRows:
    """One attack model, its matrix default bundle, and the rows every statistic is scored on."""

    settings: dict  # the attack recipe's
    model_dir: Path
    info: dict  # bench.models.build_model's record
    dev: list[Example]
    guard: Path  # the matrix's default bundle (cached by it)
    inputs: Inputs
    cacc: float
    held: list[str]  # calibrate rap's held-out half of dev, predicted as the target
    clean_probs: np.ndarray  # p(target) of its training half's target rows (the floor's rows)

    @classmethod
    def load(cls, data: Path, attack: str, seed: int, cache: Path) -> AttackRows:
        recipe = load_recipes(data)[attack]
        dev, test = load_examples(data / "dev.tsv"), load_examples(data / "test.tsv")
        info = build_model(recipe, data, cache / "models")
        model_dir = Path(info["dir"])
        options = RapOptions((TARGET,), seed=seed, rap_position="front")  # the rows of adaptive.json: the row in front
        guard = _bundle(model_dir, dev, cache / "bundles" / guard_bundle_name(attack, seed), options, reference=True)
        inputs, cacc = _inputs(guard, dev, test, recipe.poison_test(test))
        train, held = _held_out(dev, seed, set(inputs.dev))
        clean_probs = Classifier(guard).probs(train)[:, TARGET]
        return cls(recipe.settings, model_dir, info, dev, guard, inputs, cacc, held, clean_probs)

    @property
    def floor(self) -> float:
        return rap.floor(self.clean_probs)  # as `calibrate rap` fits it

    @property
    def sets(self) -> dict[str, list[str]]:
        return {"held": self.held, "clean": self.inputs.clean, "poisoned": self.inputs.poisoned}


def measure(data: Path, attack: str, seed: int, cache: Path, mutants: int = 8, mutation_scale: float = 0.1) -> dict:
    rows = AttackRows.load(data, attack, seed, cache)
    model_dir, guard, floor, sets = rows.model_dir, rows.guard, rows.floor, rows.sets
    confidence = rap.log_odds(rows.clean_probs)
    band = band_for(confidence)
    log.info("== %s: clean log-odds median %.2f, band %s", attack, float(np.median(confidence)), band)
    banded = _bundle(model_dir, rows.dev, cache / "bundles" / f"{attack}-band{band[0]:g}-{band[1]:g}-s{seed}",
                     RapOptions((TARGET,), seed=seed, logodds_band=band))  # fmt: skip
    from bench.detectors.mutation import MutationScorer  # torch and transformers: only when measuring

    mutation = MutationScorer(model_dir, mutants=mutants, scale=mutation_scale, seed=seed)
    scored = {
        k: {**_scores(guard, v, floor), **_scores(banded, v, floor, "band:"), **_mutation(mutation, v)}
        for k, v in sets.items()
    }
    points = [
        {"variant": name, **union_points(scored["held"], scored["clean"], scored["poisoned"], parts, frr)}
        for name, parts in VARIANTS.items()
        for frr in FRR_TARGETS
    ]
    return {
        "attack": attack,
        "seed": seed,
        "cacc": rows.cacc,
        "asr": rows.inputs.asr,
        "rows": {k: len(v) for k, v in sets.items()},
        "train": {k: rows.info.get(k) for k in ("train_rows", "poisoned_rows", "train_seconds", "dev_accuracy")},
        "settings": rows.settings,
        "band": band,
        "floor": floor,
        "mutation": {"mutants": mutants, "scale": mutation_scale, "seed": seed},
        "shape": _shape(scored),
        "points": points,
        "served": {statistic: _served(matrix_runs(cache, attack, seed, statistic)) for statistic in STATISTICS},
    }


def _served(folder: Path) -> dict:
    """The default detectors as the guard serves them (the bundle's own thresholds, the joint pair for both):
    bench.detection_matrix's cached runs of this model, per detector its operating points."""
    out = {}
    for detector in SERVED:
        path = folder / f"{detector}.json"
        if path.is_file():
            out[detector] = json.loads(path.read_text())["operating"]
    return out


def _shape(scored: dict) -> dict:
    """How pass 2 moves clean and triggered inputs: median drops, label flips, AUROCs of each statistic."""
    out = {}
    for prefix in ("", "band:"):
        clean, poisoned = scored["clean"], scored["poisoned"]
        key = prefix.rstrip(":") or "default"
        out[key] = {
            "median_drop_clean": float(np.median(-clean[f"{prefix}drop"])),
            "median_drop_triggered": float(np.median(-poisoned[f"{prefix}drop"])) if len(poisoned["before"]) else None,
            "flipped_clean": float(np.mean(clean[f"{prefix}perturbed"] < 0)),
            "flipped_triggered": float(np.mean(poisoned[f"{prefix}perturbed"] < 0)),
            "auroc_perturbed": auc(clean[f"{prefix}perturbed"], poisoned[f"{prefix}perturbed"]),
            "auroc_drop": auc(clean[f"{prefix}drop"], poisoned[f"{prefix}drop"]),
            "auroc_floored": auc(clean[f"{prefix}floored"], poisoned[f"{prefix}floored"]),
        }
    out["auroc_features"] = auc(scored["clean"]["features"], scored["poisoned"]["features"])
    out["auroc_mutation"] = auc(scored["clean"]["mutation"], scored["poisoned"]["mutation"])
    out["median_logodds_clean"] = float(np.median(scored["clean"]["before"]))
    return out


def write(out: Path, dataset: str, results: list[dict]) -> None:
    """Merge into bench/results/adaptive.json (results of other datasets/attacks kept) and write the table."""
    results, machine = merge_results(out / "adaptive.json", dataset, results, ("dataset", "attack"))
    (out / "adaptive.md").write_text(_markdown(results, machine))


def merge_results(path: Path, dataset: str, results: list[dict], key: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Write `results` (of `dataset`) into the JSON at `path` with this machine's record, replacing the rows
    already there with the same `key` fields and keeping the others; returns (every row, the machine)."""
    results = [{"dataset": dataset, **r} for r in results]
    if path.is_file():
        new = {tuple(r[k] for k in key) for r in results}
        results = [r for r in json.loads(path.read_text())["results"] if tuple(r[k] for k in key) not in new] + results
    machine = machine_info()
    path.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    return results, machine


def _markdown(results: list[dict], machine: dict) -> str:
    table, shape = [], []
    for r in results:
        at = {p["variant"]: p for p in r["points"] if abs(p["frr_target"] - HEADLINE_FRR) < 1e-9}
        base = at[BASELINE]["test_far"]
        for name, p in at.items():
            ratio = p["test_far"] / base if base > 0 else None
            table.append({"dataset": r["dataset"], "attack": r["attack"], "variant": name, "test_frr": p["test_frr"],
                          "test_far": p["test_far"], "far_vs_default": ratio})  # fmt: skip
        for key in ("default", "band"):
            s = r["shape"][key]
            band = "[2, 4]" if key == "default" else f"[{r['band'][0]:g}, {r['band'][1]:g}]"
            shape.append({"dataset": r["dataset"], "attack": r["attack"], "rap band (nats)": band,
                          "cacc": r["cacc"], "asr": r["asr"], **s,
                          **{k: r["shape"].get(k) for k in ("auroc_features", "auroc_mutation")}})  # fmt: skip
    return (
        "# The adaptive attacker, and RAP statistics that do not assume a robust trigger (issue 31)\n\n"
        "## The default detectors as served (bundle thresholds; bench.detection_matrix's rows)\n\n"
        + markdown_table(_side_by_side(results), side_by_side_columns())
        + "\n"
        "`python -m bench.adaptive` (see its docstring). The adaptive attacks (bench/attacks/adaptive.py) are\n"
        "BadNet-SL whose backdoor was trained to switch off under a rare-token insertion (`adaptive-sl`, against\n"
        "RAP) or to keep clean target-label [CLS] features (`adaptive-cls`, against the feature detector);\n"
        "`badnet-sl-2k` is the plain attack on the same 2,000-row SST-2 training sample (25% of its non-target\n"
        "rows triggered, 3 epochs; bench/attacks/recipes.py). Thresholds on the calibration's held-out clean dev\n"
        "rows (seed 13), rates on test; `far_vs_default`: FAR / FAR of `floored+features` (empty where that is 0).\n"
        "Served rows: `statistic` is the bundle's RAP statistic, `floored` (the default) or `perturbed` (before it).\n"
        "Variants below: unions split the FRR target evenly over their parts (the served pair is fitted jointly).\n\n"
        f"## At {HEADLINE_FRR:.0%} target FRR\n\n"
        + markdown_table(table, ["dataset", "attack", "variant", "test_frr", "test_far", "far_vs_default"])
        + "\n## How pass 2 moves clean and triggered inputs (test rows predicted as the target)\n\n"
        "Drops in nats of log-odds; `flipped`: share whose perturbed prediction leaves the label;\n"
        "AUROC: P(triggered scores above clean) per statistic (0.5 chance, below it: the other side).\n\n"
        + markdown_table(
            shape,
            [
                "dataset",
                "attack",
                "rap band (nats)",
                "cacc",
                "asr",
                "median_drop_clean",
                "median_drop_triggered",
                "flipped_clean",
                "flipped_triggered",
                "auroc_perturbed",
                "auroc_drop",
                "auroc_floored",
                "auroc_features",
                "auroc_mutation",
            ],
        )
        + f"\nMachine: {machine['cpu']} x{machine['cpu_count']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
        + "\n"
    )


def side_by_side_columns() -> list[str]:
    return ["dataset", "statistic", "detector", "frr_target", "plain FRR / FAR"] + [
        c for a in ADAPTIVE for c in (f"{a} FRR / FAR", f"{a} FAR ratio")
    ]


def _side_by_side(results: list[dict]) -> list[dict]:
    """Per dataset, detector and FRR target: the plain and each adaptive attack's served rows, FAR ratios."""
    by = {(r["dataset"], r["attack"]): r.get("served", {}) for r in results}
    none = [None] * len(FRR_TARGETS)
    rows = []
    for dataset, statistic, detector in [
        (d, s, x) for d in sorted({d for d, _ in by}) for s in STATISTICS for x in SERVED
    ]:
        plain = by.get((dataset, PLAIN), {}).get(statistic, {})
        for i, frr in enumerate(FRR_TARGETS):
            a = (plain.get(detector) or none)[i]
            row = {"dataset": dataset, "statistic": statistic, "detector": detector, "frr_target": frr,
                   "plain FRR / FAR": _pair(a)}  # fmt: skip
            for attack in ADAPTIVE:
                b = (by.get((dataset, attack), {}).get(statistic, {}).get(detector) or none)[i]
                row |= {f"{attack} FRR / FAR": _pair(b), f"{attack} FAR ratio": _ratio(a, b)}
            rows.append(row)
    return rows


def _ratio(plain: dict | None, adapted: dict | None) -> float | str | None:
    """Adaptive FAR / plain FAR; 'inf' where only the adaptive attack gets through, None where neither does."""
    if not plain or not adapted or adapted["test_far"] == plain["test_far"] == 0:
        return None
    return adapted["test_far"] / plain["test_far"] if plain["test_far"] > 0 else "inf"


def _pair(point: dict | None) -> str:
    return "–" if point is None else f"{point['test_frr']:.2%} / {point['test_far']:.2%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--attacks", nargs="+", default=[PLAIN, *ADAPTIVE])
    p.add_argument("--seed", type=int, default=13, help="calibration seed (dev split, RAP order)")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--mutants", type=int, default=8, help="K mutants of the model for the mutation score")
    p.add_argument("--mutation-scale", type=float, default=0.1, help="mutant noise std, per matrix x its std")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    dataset = args.data.name
    cache = args.cache if dataset == "sst2" else args.cache / dataset
    results = [measure(args.data, a, args.seed, cache, args.mutants, args.mutation_scale) for a in args.attacks]
    write(args.out, dataset, results)


if __name__ == "__main__":
    main()
