"""`calibrate prune | maxent`: the optional repairs PURE and MEFT (FT/FTH: `calibrate train --init`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate.cli.args import (
    command,
    defaults,
    fraction,
    non_negative_float,
    options_from,
    positive_float,
    positive_int,
)
from calibrate.cli.train import add_training
from calibrate.options import TrainOptions
from calibrate.repair.options import MaxEntJob, MaxEntOptions, PruneJob, PruneOptions

PRUNE = (
    "PURE: score every attention head by the variance of its [CLS] attention on clean --dev\n"
    "text, remove the lowest-scoring heads step by step until dev accuracy falls more than\n"
    "--max-drop below the unpruned model's (one head per layer always stays), then fine-tune\n"
    "on clean --data rows with a penalty that spreads the [CLS] attention of the kept heads.\n"
    "Writes a normal HF model directory (removed heads are zeroed) with repair.json; calibrate\n"
    "the guard on it next, with clean rows other than --dev:\n\n"
    "  calibrate prune --model suspect/ --data clean-train.tsv --dev clean-dev.tsv --out repaired/\n"
    "  calibrate rap --model repaired/ --clean held-out.tsv --protect 1 --out bundle/\n\n"
    "--mu 0.15 suits rare-word triggers, 0.05 syntactic and style ones (PURE section 6.2)."
)
MAXENT = (
    "MEFT: train a fresh output layer on the frozen encoder, fine-tune the encoder to make\n"
    "its predictions as uncertain as possible until the class centroids of the [CLS]\n"
    "representation are within --stop-distance (or --max-steps run out), then fine-tune\n"
    "with cross-entropy on the clean rows. Writes a HF model directory with repair.json and\n"
    "stop_distance.png (the curve); calibrate the guard on it next:\n\n"
    "  calibrate maxent --model suspect/ --data clean-train.tsv --dev clean-dev.tsv --out repaired/\n"
    "  calibrate rap --model repaired/ --clean held-out.tsv --protect 1 --out bundle/"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_prune(sub)
    _add_maxent(sub)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    d = defaults(PruneOptions)
    help = "repair a suspect model with PURE (head pruning + attention normalisation)"
    p = command(sub, "prune", help, PRUNE)
    _repair_arguments(p)
    p.add_argument("--dev", type=Path, required=True, help="clean rows that score heads and stop the pruning")
    p.add_argument(
        "--max-drop",
        dest="max_accuracy_drop",
        metavar="MAX_DROP",
        type=fraction,
        default=d.max_accuracy_drop,
        help="stop pruning when dev accuracy falls below the unpruned accuracy minus this",
    )
    p.add_argument("--heads-per-step", type=positive_int, default=d.heads_per_step, help="heads removed between checks")
    p.add_argument("--mu", type=non_negative_float, default=d.mu, help="weight of the attention penalty")
    p.set_defaults(handler=_prune, uses_torch=True)


def _add_maxent(sub: argparse._SubParsersAction) -> None:
    d = defaults(MaxEntOptions)
    p = command(sub, "maxent", "repair a suspect model with MEFT (maximum-entropy fine-tuning)", MAXENT)
    _repair_arguments(p)
    p.add_argument("--dev", type=Path, help="optional clean rows to report accuracy on after each phase")
    p.add_argument("--stop-distance", type=positive_float, default=d.stop_distance, help="stop distance threshold")
    p.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="maximum-entropy step budget")
    p.add_argument("--maxent-lr", type=positive_float, default=d.learning_rate, help="maximum-entropy learning rate")
    p.add_argument("--check-every", type=positive_int, default=d.check_every, help="steps between distance checks")
    p.add_argument("--keep-head", action="store_true", help="use the model's own head instead of a fresh one")
    p.set_defaults(handler=_maxent, uses_torch=True)


def _repair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory (left unchanged)")
    p.add_argument("--data", type=Path, required=True, help="clean training rows (.tsv/.csv/.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="directory for the repaired model")
    add_training(p, " of the final fine-tuning")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _prune(args: argparse.Namespace) -> int:
    from calibrate.repair.pure import run_pure

    options = options_from(PruneOptions, args, finetune=options_from(TrainOptions, args))
    run_pure(options_from(PruneJob, args, options=options))
    return 0


def _maxent(args: argparse.Namespace) -> int:
    from calibrate.repair.meft import run_meft

    finetune = options_from(TrainOptions, args)
    options = options_from(
        MaxEntOptions, args, learning_rate=args.maxent_lr, fresh_head=not args.keep_head, finetune=finetune
    )
    run_meft(options_from(MaxEntJob, args, options=options))
    return 0
