"""`calibrate train`: fine-tune a classifier, or with --init the FT/FTH repair baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate.cli.args import add_learning_rate, command, defaults, options_from, positive_int
from calibrate.options import TrainJob, TrainOptions

DESCRIPTION = (
    "Fine-tune a sequence classifier and save a Hugging Face model directory.\n"
    "Users normally bring their own model; this exists for demos and benchmarks.\n\n"
    "  calibrate train --data train.tsv --dev dev.tsv --out model/ --epochs 3\n\n"
    "With --init, keep training an existing classifier on clean rows instead: the FT repair\n"
    "baseline, or FTH with --high-lr (the learning rate x2.5). It writes repair.json, which\n"
    "`calibrate rap` copies into the bundle's report:\n\n"
    "  calibrate train --init suspect/ --data clean.tsv --dev dev.tsv --out ft/ --epochs 1"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "train", "fine-tune a sequence classifier", DESCRIPTION)
    p.add_argument("--data", type=Path, required=True, help="training rows (.tsv/.csv/.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--dev", type=Path, help="optional rows to report accuracy on after training")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--base", type=Path, help="base encoder directory (default: the packaged all-MiniLM-L6-v2)")
    start.add_argument("--init", type=Path, help="existing classifier to keep training, head included (FT/FTH)")
    p.add_argument("--high-lr", action="store_true", help="with --init: FTH, the learning rate times 2.5")
    add_training(p, "")
    p.add_argument(
        "--label-names",
        type=lambda s: tuple(s.split(",")),
        default=(),
        help="comma-separated names for labels 0,1,... (e.g. negative,positive)",
    )
    p.add_argument("--force", action="store_true", help="with --init: replace --out if it exists")
    p.set_defaults(handler=_train, uses_torch=True)


def add_training(p: argparse.ArgumentParser, of: str) -> None:
    """--epochs, --lr, --batch-size, --max-length, --seed, with TrainOptions' defaults."""
    d = defaults(TrainOptions)
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"training epochs{of}")
    add_learning_rate(p, d.learning_rate, f"learning rate{of}")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="rows per training step")
    p.add_argument("--max-length", type=positive_int, default=d.max_length, help="tokens per input")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")


def _train(args: argparse.Namespace) -> int:
    from calibrate.repair.baselines import run_train

    run_train(options_from(TrainJob, args, options=options_from(TrainOptions, args)))
    return 0
