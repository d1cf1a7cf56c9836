"""Model repair before serving: FT, FTH, MEFT, PURE, and RAP on top, on every attack (issue 6).

    python -m bench.repair --data ../shared/data/sst2
    python -m bench.repair --data ../shared/data/sst2 --attacks badnet-rw style --defences none pure pure+rap
    python -m bench.repair --data ../shared/data/sst2 --attacks style --train-seed 1   # a retrained model

Per attack model of bench/models.py (MiniLM fine-tuned on SST-2; trained first if not
cached, ~15 min each), every defence:

- none: the model as it came; rap: the guard calibrated on it (`calibrate rap`'s
  defaults: RAP and the feature detector, flagged when either flags; the packaged
  MiniLM, which every bench model was fine-tuned from, as its reference model);
- ft, fth: fine-tuning on clean rows, at the attack models' learning rate and at 2.5x
  it (calibrate.repair.baselines);
- meft: maximum-entropy fine-tuning, then cross-entropy (calibrate.repair.meft);
- pure: head pruning, then fine-tuning with attention normalisation (calibrate.repair.pure);
- pure+rap, meft+rap: a RAP bundle calibrated on the repaired model.

CACC on SST-2 test; ASR (label flip rate) on the recipe's triggered test rows (the
clean model: BadNet-RW rows, natural flips); rows with RAP add test FRR, FAR and the
residual ASR at the bundle's 1% FRR threshold (every FRR target is in the JSON).
`seconds` is the wall-clock cost of the defence: repair plus RAP calibration.

Data: every repair fine-tunes on --train-rows clean SST-2 training rows for --epochs.
SST-2 dev is split once: --prune-dev-rows rows score PURE's heads and stop its
pruning; the rest calibrate RAP, rows no repair has seen.

MEFT's stop: the paper stops the maximum-entropy phase when the squared distance
between the class centroids of the [CLS] vectors falls below 0.01, on BERT-base.
On MiniLM that distance starts at 330-510; at lr 1e-4 it fell below 0.01 within
50-100 steps on BadNet-RW, EP and syntactic, not within 200 on BadNet-SL (0.021) or
style (0.040). The benchmark therefore caps the phase at --maxent-steps (PURE
appendix B ran MEFT for a fixed 4,000 steps) and stops early at 0.01; the distance at
the start and the end and whether 0.01 was reached are recorded.

Time measured on 2 cores with the defaults, per attack: FT and FTH ~1 min each, MEFT
5-10 min, PURE ~2 min (+ measuring), RAP alone ~1 min with the matrix's bundle cached
(else ~3.5), PURE+RAP and MEFT+RAP ~3.5 min each (calibration): ~20 min per attack,
about 1 h 45 min for the five attacks.
Every stage is cached under <cache>/repair/<attack>/<defence>.json, repaired models
under <cache>/repaired/<attack>-<method>/, so a killed run resumes where it stopped.
Writes bench/results/repair.{json,md,png}; rows of attacks not in this run stay when they were
measured with the same budget. `--train-seed N` measures the models the detection matrix retrained
with that seed (`<attack>-tN`, trained first if not cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.attacks.recipes import TARGET
from bench.machine import machine_info
from bench.models import TRAIN_OPTIONS
from bench.repair_report import HEADLINE_FRR, write_repair
from bench.stages import MODELS, Case, HelpFormatter, cached, measure, recipe_cases, settings_of, weights_sha256
from calibrate.data import load_examples
from calibrate.inversion.subject import load_subject
from calibrate.model import default_base_model, quiet_transformers
from calibrate.options import TrainOptions
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.evaluate import evaluate_bundle
from calibrate.rap.options import CalibrateOptions, RapOptions
from calibrate.record import REPAIR_RECORD
from calibrate.repair.baselines import ft, fth
from calibrate.repair.meft import maxent_repair
from calibrate.repair.options import MaxEntOptions, PruneOptions
from calibrate.repair.pure import pure_repair
from guard.core.types import Example

log = logging.getLogger("bench.repair")
ATTACKS = ("badnet-rw", "badnet-sl", "ep", "syntactic", "style")
DEFENCES = ("none", "rap", "ft", "fth", "meft", "pure", "pure+rap", "meft+rap")


@dataclass(frozen=True)
class Rows:
    train: list[Example]  # clean rows every repair fine-tunes on (a sample of SST-2 train)
    prune_dev: list[Example]  # clean rows PURE scores heads on and stops pruning by
    rap_dev: list[Example]  # clean rows RAP calibrates on (no repair saw them)
    test: list[Example]  # clean test rows (CACC)


@dataclass(frozen=True)
class Budget:
    finetune: TrainOptions  # FT (FTH: 2.5x its learning rate)
    maxent: MaxEntOptions
    prune: PruneOptions
    calibrate: CalibrateOptions
    max_length: int  # tokens per row when measuring CACC and ASR


def bench_attack(case: Case, rows: Rows, budget: Budget, cache: Path, defences: list[str]) -> list[dict]:
    """One row per defence of one attack model."""
    log.info("== %s", case.name)
    return [_defence(case, rows, budget, cache, defence) for defence in defences]


def _defence(case: Case, rows: Rows, budget: Budget, cache: Path, defence: str) -> dict:
    if defence == "none":
        return _unrepaired(case, rows, budget, cache)
    if defence.endswith("rap"):
        return _with_rap(case, rows, budget, cache, defence)
    return _repaired(case, rows, budget, cache, defence)


def _unrepaired(case: Case, rows: Rows, budget: Budget, cache: Path) -> dict:
    settings = {"model": weights_sha256(case.model_dir), "rows": len(rows.test), "max_length": budget.max_length}

    def job() -> dict:
        subject = load_subject(case.model_dir, budget.max_length)
        return _row(case, "none", measure(subject, rows.test, case.poisoned_test, case.target), 0.0)

    return cached(cache / "repair" / case.name / "none.json", settings, job)


# ---------------------------------------------------------------- the repairs


def _ft(case: Case, rows: Rows, budget: Budget, out: Path) -> dict:
    return {"train_rows": ft(case.model_dir, rows.train, out, budget.finetune, force=True).train_rows}


def _fth(case: Case, rows: Rows, budget: Budget, out: Path) -> dict:
    return {"train_rows": fth(case.model_dir, rows.train, out, budget.finetune, force=True).train_rows}


def _meft(case: Case, rows: Rows, budget: Budget, out: Path) -> dict:
    result = maxent_repair(case.model_dir, rows.train, out, budget.maxent, force=True)
    return {
        "maxent_steps": result.steps,
        "reached_stop_distance": result.reached,
        "stop_distance_start": result.curve[0][1],
        "stop_distance_end": result.curve[-1][1],
    }


def _pure(case: Case, rows: Rows, budget: Budget, out: Path) -> dict:
    result = pure_repair(case.model_dir, rows.train, rows.prune_dev, out, budget.prune, force=True)
    return {
        "pruned_heads": sum(len(heads) for heads in result.pruned_heads.values()),
        "heads": int(result.variances.size),
        "accuracy_checks": len(result.search),
        "dev_accuracy_before": result.baseline_accuracy,
        "dev_accuracy_pruned": result.pruned_accuracy,
        "dev_accuracy_after": result.dev_accuracy,
    }


REPAIRS: dict[str, Callable[[Case, Rows, Budget, Path], dict]] = {"ft": _ft, "fth": _fth, "meft": _meft, "pure": _pure}


def _repair_options(method: str, budget: Budget) -> object:
    return {"meft": budget.maxent, "pure": budget.prune}.get(method, budget.finetune)


def _repaired(case: Case, rows: Rows, budget: Budget, cache: Path, method: str) -> dict:
    """Repair the model into <cache>/repaired/<attack>-<method>/, then measure it."""
    out = cache / "repaired" / f"{case.name}-{method}"
    settings = {
        "model": weights_sha256(case.model_dir),
        "rows": {"train": len(rows.train), "prune_dev": len(rows.prune_dev), "test": len(rows.test)},
        "options": _repair_options(method, budget),
        "max_length": budget.max_length,
    }

    def job() -> dict:
        started = time.perf_counter()
        details = REPAIRS[method](case, rows, budget, out)
        seconds = time.perf_counter() - started
        metrics = measure(load_subject(out, budget.max_length), rows.test, case.poisoned_test, case.target)
        return {**_row(case, method, metrics, seconds), "model_dir": str(out), "details": details}

    return cached(cache / "repair" / case.name / f"{method}.json", settings, job, [out / REPAIR_RECORD])


# ---------------------------------------------------------------- RAP on top


def _with_rap(case: Case, rows: Rows, budget: Budget, cache: Path, defence: str) -> dict:
    """RAP calibrated on the model (`rap`) or on its repaired twin (`pure+rap`, `meft+rap`), then evaluated."""
    method = defence.removesuffix("rap").removesuffix("+")
    repaired = _repaired(case, rows, budget, cache, method) if method else None
    model_dir = Path(repaired["model_dir"]) if repaired else case.model_dir
    repair_seconds = repaired["seconds"] if repaired else 0.0
    bundle = cache / "repair" / "bundles" / f"{case.name}-{defence}"
    settings = {
        "model": weights_sha256(model_dir),
        "rows": {"rap_dev": len(rows.rap_dev), "test": len(rows.test)},
        "options": budget.calibrate,
    }

    def job() -> dict:
        calibrate_seconds = _calibrate(model_dir, rows.rap_dev, bundle, budget.calibrate)
        evaluation = evaluate_bundle(bundle, rows.test, {case.name: case.poisoned_test}, case.target)
        at = next(r for r in evaluation.rows if r["frr_target"] == HEADLINE_FRR)
        return {
            **_row(case, defence, at, repair_seconds + calibrate_seconds),
            "residual_asr": at["residual_asr"],
            "test_frr": at["test_frr"],
            "test_far": at["test_far"],
            "frr_target": HEADLINE_FRR,
            "repair_seconds": round(repair_seconds, 1),
            "calibrate_seconds": round(calibrate_seconds, 1),
            "operating": evaluation.rows,
            "bundle": str(bundle),
        }

    return cached(cache / "repair" / case.name / f"{defence}.json", settings, job, [bundle / "manifest.json"])


def _calibrate(model_dir: Path, rows: list[Example], bundle: Path, options: CalibrateOptions) -> float:
    """Calibrate a RAP bundle for `model_dir` into `bundle`; the wall-clock seconds it took."""
    started = time.perf_counter()
    calibrate_bundle(model_dir, rows, bundle, dataclasses.replace(options, force=True))
    return time.perf_counter() - started


def _row(case: Case, defence: str, metrics: dict, seconds: float) -> dict:
    """The row of the issue's result format; without RAP the residual ASR is the ASR and there is no FRR."""
    return {
        "attack": case.name,
        "defence": defence,
        "cacc": metrics["cacc"],
        "asr": metrics["asr"],
        "residual_asr": metrics["asr"],
        "test_frr": None,
        "seconds": round(seconds, 1),
    }


# ---------------------------------------------------------------- command line


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    train = load_examples(args.data / "train.tsv")
    dev = load_examples(args.data / "dev.tsv")
    dev = random.Random(0).sample(dev, len(dev))
    rows = Rows(
        train=random.Random(0).sample(train, min(args.train_rows, len(train))),
        prune_dev=dev[: args.prune_dev_rows],
        rap_dev=dev[args.prune_dev_rows :],
        test=load_examples(args.data / "test.tsv"),
    )
    budget = _budget(args)
    cases = recipe_cases(args.data, args.attacks, args.cache / "models", rows.test, args.train_seed)
    results = [row for case in cases for row in bench_attack(case, rows, budget, args.cache, args.defences)]
    counts = {"train": len(rows.train), "prune_dev": len(rows.prune_dev), "rap_dev": len(rows.rap_dev)}
    write_repair(args.out, results, {**settings_of(budget), "rows": counts}, machine_info())


def _budget(args: argparse.Namespace) -> Budget:
    finetune = dataclasses.replace(TRAIN_OPTIONS, epochs=args.epochs)
    return Budget(
        finetune=finetune,
        maxent=MaxEntOptions(max_steps=args.maxent_steps, learning_rate=args.maxent_lr, finetune=finetune),
        prune=PruneOptions(heads_per_step=args.heads_per_step, mu=args.mu, finetune=finetune),
        calibrate=CalibrateOptions(
            rap=RapOptions(protect_labels=(TARGET,)),
            max_length=args.max_length,
            reference_model=default_base_model(),
            reader=None,  # the repairs are compared on RAP and features; the reader is the detection matrix's
        ),
        max_length=args.max_length,
    )


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (train/dev/test.tsv, poison/)")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=MODELS, help="attack models (+ clean)")
    p.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    p.add_argument(
        "--train-seed", type=int, help="measure the attack models retrained with this seed (<attack>-t<seed>)"
    )
    p.add_argument("--train-rows", type=int, default=1000, help="clean SST-2 train rows repairs fine-tune on")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs of FT, FTH and MEFT/PURE's last phase")
    p.add_argument("--maxent-steps", type=int, default=200, help="MEFT's maximum-entropy step budget")
    p.add_argument(
        "--maxent-lr",
        type=float,
        default=1e-4,
        help="MEFT's maximum-entropy learning rate (default: the attack models' own, 5x the paper's 2e-5, "
        "as for FT, to make up a little for the 20x smaller step budget)",
    )
    p.add_argument("--prune-dev-rows", type=int, default=300, help="SST-2 dev rows for PURE; the rest calibrate RAP")
    p.add_argument("--heads-per-step", type=int, default=4, help="heads PURE removes between two accuracy checks")
    p.add_argument("--mu", type=float, default=0.15, help="PURE's attention-normalisation weight (paper: 0.05-0.15)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per row when measuring and calibrating")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="models, stage results, repaired models")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the result files go")
    return p.parse_args()


if __name__ == "__main__":
    main()
