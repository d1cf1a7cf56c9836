"""Trigger inversion on a model zoo: DBS scan verdicts, unlearning, hardening (issue 7).

    python -m bench.inversion --data ../shared/data/sst2
    python -m bench.inversion --data ../shared/data/sst2 --models clean badnet-rw --harden clean

The zoo is the attack models of bench/models.py (MiniLM fine-tuned on SST-2; a model
not cached yet is trained first, ~15 min each) plus three cheaper ones that vary the
seed and the target label (bench/attacks/recipes.py, zoo_recipes): clean-s1 and
clean-s2 (clean, seeds 1 and 2, 1 epoch on 2,000 rows, ~5 min each) and ep-neg (EP
with `tq` towards NEGATIVE, 2 epochs on the positives of 1,500 rows). Per model:

1. scan (calibrate.inversion.scan: DBS, a 1-token trigger, every label pair) on SST-2 dev, with
   the truth from the attack recipe. The verdict threshold on the suspect pair's loss
   is fitted on the zoo (best detection accuracy) and, for an honest estimate, leave-
   one-out; both are reported next to the scan's own threshold (default 0.1);
2. unlearn (calibrate.inversion.unlearn) the pairs the scan flagged at its own threshold,
   on a sample of clean SST-2 training rows; the unlearned model is scanned again
   on SST-2 dev (up to --rescans times) and new finds are unlearned with the rest;
3. harden (calibrate.inversion.harden) the models named by --harden (default: clean; the
   hardening paper's target is a clean model's natural backdoors) with a small
   budget: eps-mA^2 before/after.

Unlearning and hardening report CACC on SST-2 test and the planted trigger's ASR on
the recipe's triggered test rows (the clean model: BadNet-RW rows, natural flips),
before and after. Repaired models are kept as <cache>/repaired/<model>-<method>/.

Time on 2 idle cores with the defaults: a scan 1-3 min per model, an unlearning
with its rescans 5-10 min, the hardening ~30 min: about an hour for the nine models
once trained. Every stage is
cached under <cache>/inversion/<model>/, so a killed run resumes where it stopped.
Writes bench/results/inversion.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from bench.inversion_report import write_inversion
from bench.machine import machine_info
from bench.stages import ZOO, Case, HelpFormatter, cached, measure, recipe_cases, settings_of, weights_sha256
from calibrate.data import load_examples
from calibrate.inversion.harden import harden_model
from calibrate.inversion.options import HardenOptions, InversionOptions, ScanOptions, UnlearnOptions
from calibrate.inversion.scan import scan_model
from calibrate.inversion.subject import Subject, load_subject, save_model
from calibrate.inversion.unlearn import Trigger, unlearn_record, unlearn_rescanning
from calibrate.model import quiet_transformers
from calibrate.record import REPAIR_RECORD, prepare_out_dir
from guard.core.types import Example

log = logging.getLogger("bench.inversion")
HARDENED = ("clean",)


@dataclass(frozen=True)
class Rows:
    scan: list[Example]  # clean rows the scan inverts triggers on and scores them on (SST-2 dev)
    repair: list[Example]  # clean rows unlearning and hardening train on (a sample of SST-2 train)
    test: list[Example]  # clean test rows (CACC)


@dataclass(frozen=True)
class Budget:
    scan: ScanOptions
    unlearn: UnlearnOptions
    rescans: int  # scans of an unlearned model, each followed by unlearning again if it found new triggers
    harden: HardenOptions
    harden_rows: int  # the first rows of Rows.repair that hardening uses (it inverts triggers every round)
    max_length: int


def bench_model(case: Case, rows: Rows, budget: Budget, cache: Path, harden: bool) -> dict:
    """One model: its scan row, and its repair rows (unlearning if the scan flagged a pair; hardening if asked)."""
    log.info("== %s", case.name)
    report = _scan(case, rows, budget, cache)
    repairs = []
    triggers = flagged_triggers(report)
    if triggers:
        repairs.append(_unlearn(case, rows, budget, cache, triggers))
    if harden:
        repairs.append(_harden(case, rows, budget, cache))
    return {"scan": scan_row(case, report), "repair": repairs}


def flagged_triggers(report: dict) -> list[Trigger]:
    """The triggers of the pairs a scan report flagged (at the scan's own threshold)."""
    return [Trigger(tuple(p["token_ids"]), p["target"], p["text"]) for p in report["pairs"] if p["flagged"]]


def scan_row(case: Case, report: dict) -> dict:
    suspect = report["suspect"]
    return {
        "model": case.name,
        "backdoored": case.backdoored,
        "target": case.target if case.backdoored else None,
        "true_trigger": case.true_trigger if case.backdoored else None,
        "found_trigger": suspect["text"],
        "found_pair": f"{suspect['victim']}->{suspect['target']}",
        "loss": suspect["loss"],
        "asr": suspect["asr"],
        "verdict_scan": report["backdoored"],
        "scan_threshold": report["threshold"],
        "flagged": [f"{p['victim']}->{p['target']} {p['text']}" for p in report["pairs"] if p["flagged"]],
        "trigger_recovered": trigger_recovered(suspect["text"], case.true_trigger) if case.backdoored else None,
        "target_recovered": suspect["target"] == case.target if case.backdoored else None,
        "seconds": report["seconds"],
    }


def trigger_recovered(found: str, true_trigger: list[str] | None) -> bool | None:
    """Every word of the found trigger is a word of a planted trigger (None: no typed trigger to recover)."""
    if true_trigger is None:
        return None
    planted = {word for trigger in true_trigger for word in trigger.lower().split()}
    found_words = found.lower().split()
    return bool(found_words) and set(found_words) <= planted


def _scan(case: Case, rows: Rows, budget: Budget, cache: Path) -> dict:
    settings = {"model": weights_sha256(case.model_dir), "rows": len(rows.scan), "options": budget.scan}

    def job() -> dict:
        subject = load_subject(case.model_dir, budget.max_length)
        return scan_model(subject, rows.scan, budget.scan).to_json()

    return cached(cache / "inversion" / case.name / "scan.json", settings, job)


def _before(case: Case, rows: Rows, budget: Budget, cache: Path) -> dict:
    """CACC and planted-trigger ASR of the model as it came (shared by every repair of it)."""
    settings = {"model": weights_sha256(case.model_dir), "rows": len(rows.test), "max_length": budget.max_length}

    def job() -> dict:
        return measure(load_subject(case.model_dir, budget.max_length), rows.test, case.poisoned_test, case.target)

    return cached(cache / "inversion" / case.name / "before.json", settings, job)


def _unlearn(case: Case, rows: Rows, budget: Budget, cache: Path, triggers: list[Trigger]) -> dict:
    before = _before(case, rows, budget, cache)
    out = cache / "repaired" / f"{case.name}-unlearn"
    settings = {
        "model": weights_sha256(case.model_dir),
        "triggers": triggers,
        "rows": len(rows.repair),
        "options": budget.unlearn,
        "rescans": budget.rescans,
        "scan": budget.scan,
        "max_length": budget.max_length,
    }

    def job() -> dict:
        subject = load_subject(case.model_dir, budget.max_length)
        started = time.perf_counter()
        result, rescans = unlearn_rescanning(
            subject, rows.repair, triggers, budget.unlearn, budget.scan, budget.rescans, rows.scan
        )
        seconds = time.perf_counter() - started
        details = unlearn_record(result, rescans)
        after = _save_and_measure(subject, case, rows, out, "unlearn", details)
        return {
            **_repair_row(case, "unlearn", before, after, seconds),
            "triggers": [t.text for t in result.triggers],
            "found_asr_before": result.asr_before,  # the unlearned triggers' own ASR, on held-out repair rows
            "found_asr_after": result.asr_after,
            "rescans": details["rescans"],
        }

    return cached(cache / "inversion" / case.name / "unlearn.json", settings, job, [out / REPAIR_RECORD])


def _harden(case: Case, rows: Rows, budget: Budget, cache: Path) -> dict:
    before = _before(case, rows, budget, cache)
    out = cache / "repaired" / f"{case.name}-harden"
    harden_rows = rows.repair[: budget.harden_rows]
    settings = {
        "model": weights_sha256(case.model_dir),
        "rows": len(harden_rows),
        "options": budget.harden,
        "max_length": budget.max_length,
    }

    def job() -> dict:
        subject = load_subject(case.model_dir, budget.max_length)
        result = harden_model(subject, harden_rows, budget.harden)
        after = _save_and_measure(subject, case, rows, out, "harden", result.to_json())
        return {
            **_repair_row(case, "harden", before, after, result.seconds),
            "eps_ma2_before": result.eps_ma2_before,
            "eps_ma2_after": result.eps_ma2_after,
            "heldout_cacc_before": result.cacc_before,  # on hardening's own held-out rows
            "heldout_cacc_after": result.cacc_after,
            "rounds": len(result.rounds),
            "measure_seconds": round(result.measure_seconds, 1),
        }

    return cached(cache / "inversion" / case.name / "harden.json", settings, job, [out / REPAIR_RECORD])


def _save_and_measure(subject: Subject, case: Case, rows: Rows, out: Path, method: str, details: dict) -> dict:
    prepare_out_dir(case.model_dir, out, force=True)
    save_model(subject, out, method, details)
    return measure(subject, rows.test, case.poisoned_test, case.target)


def _repair_row(case: Case, method: str, before: dict, after: dict, seconds: float) -> dict:
    return {
        "model": case.name,
        "method": method,
        "cacc_before": before["cacc"],
        "cacc_after": after["cacc"],
        "asr_before": before["asr"],
        "asr_after": after["asr"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    train = load_examples(args.data / "train.tsv")
    rows = Rows(
        scan=load_examples(args.data / "dev.tsv"),
        repair=random.Random(0).sample(train, min(args.clean_rows, len(train))),
        test=load_examples(args.data / "test.tsv"),
    )
    budget = _budget(args)
    cases = recipe_cases(args.data, args.models, args.cache / "models", rows.test)
    results = [bench_model(case, rows, budget, args.cache, case.name in args.harden) for case in cases]
    counts = {"scan": len(rows.scan), "repair": len(rows.repair), "test": len(rows.test)}
    write_inversion(args.out, results, {**settings_of(budget), "rows": counts}, machine_info())


def _budget(args: argparse.Namespace) -> Budget:
    inversion = InversionOptions(steps=args.steps)
    return Budget(
        scan=ScanOptions(loss_threshold=args.loss_threshold, inversion=inversion),
        unlearn=UnlearnOptions(teacher_weight=args.teacher_weight, reset_embeddings=args.reset_embeddings),
        rescans=args.rescans,
        harden=HardenOptions(
            max_trigger_length=args.harden_length,
            epochs=1,
            learning_rate=args.harden_lr,
            inversion=InversionOptions(steps=args.harden_steps),
        ),
        harden_rows=args.harden_rows,
        max_length=args.max_length,
    )


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (train/dev/test.tsv, poison/)")
    p.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO, help="the zoo (default: all)")
    p.add_argument("--harden", nargs="*", default=list(HARDENED), choices=ZOO, help="models to harden")
    p.add_argument("--steps", type=int, default=50, help="DBS steps per scanned pair")
    p.add_argument("--loss-threshold", type=float, default=0.1, help="the scan's own verdict threshold")
    p.add_argument("--clean-rows", type=int, default=1000, help="SST-2 train rows to unlearn/harden on")
    p.add_argument("--teacher-weight", type=float, default=UnlearnOptions().teacher_weight, help="unlearning targets")
    p.add_argument("--reset-embeddings", default=UnlearnOptions().reset_embeddings, help="outliers, all or none")
    p.add_argument("--rescans", type=int, default=2, help="scans of an unlearned model (then unlearn new finds)")
    p.add_argument("--harden-rows", type=int, default=600, help="of those, rows hardening uses (30%% measure)")
    p.add_argument("--harden-lr", type=float, default=3e-5, help="hardening's learning rate (one pass, so above 2e-5)")
    p.add_argument("--harden-length", type=int, default=4, help="epsilon: the longest trigger hardening inverts")
    p.add_argument("--harden-steps", type=int, default=20, help="DBS steps per inversion while hardening")
    p.add_argument("--max-length", type=int, default=128, help="tokens per row (the matrix's bundles use 128)")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="models, stage results, repaired models")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the result files go")
    return p.parse_args()


if __name__ == "__main__":
    main()
