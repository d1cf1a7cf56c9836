"""`calibrate`: offline commands. Each one parses, builds options, calls one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guard.core.console import Parser, command_parser, dispatch
from guard.core.errors import InputError

DESCRIPTION = """\
Turn a fine-tuned text classifier you did not train into a verified guard bundle.

  calibrate demo                                   # everything end-to-end, offline, ~3 min
  calibrate train --data train.tsv --out model/    # fine-tune a classifier (demos, benchmarks)
  calibrate prune --model model/ --data clean.tsv --dev dev.tsv --out repaired/   # optional repair: PURE
  calibrate maxent --model model/ --data clean.tsv --out repaired/                # optional repair: MEFT
  calibrate scan --model model/ --clean dev.tsv --out scan.json                   # backdoored? trigger? (DBS)
  calibrate unlearn --model model/ --clean dev.tsv --scan scan.json --out repaired/   # repair: unlearn it
  calibrate harden --model model/ --clean dev.tsv --out hardened/                 # repair: hardening
  calibrate rap --model model/ --clean dev.tsv --protect 1 --out bundle/
  calibrate evaluate --bundle bundle/ --clean test.tsv --poisoned badnet=poison.tsv

Data files: .tsv (header 'text<TAB>label'), .csv (columns text,label) or .jsonl
({"text": ..., "label": ...}); labels are integer class ids.
"""
# Where scan/unlearn/harden put a trigger (calibrate.inversion.POSITIONS; not imported: it loads torch).
POSITIONS = ("start", "middle", "end", "random")
UNLEARN_RESETS = ("outliers", "all", "none")  # calibrate.unlearn.RESET_MODES
UNLEARN_TEACHER_WEIGHT = 1.0  # calibrate.unlearn.UnlearnOptions.teacher_weight (tests keep the two equal)


def main(argv: list[str] | None = None) -> int:
    return dispatch(_parser(), argv, prepare=_quiet)


def _quiet(args: argparse.Namespace) -> None:
    if getattr(args, "uses_torch", False) and not args.verbose:  # keep torch off the path of the others
        from calibrate.model import quiet_transformers

        quiet_transformers()


def _parser() -> Parser:
    parser, sub = command_parser("calibrate", DESCRIPTION)
    _add_train(sub)
    _add_prune(sub)
    _add_maxent(sub)
    _add_scan(sub)
    _add_unlearn(sub)
    _add_harden(sub)
    _add_rap(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a sequence classifier",
        description=(
            "Fine-tune a sequence classifier and save a Hugging Face model directory.\n"
            "Users normally bring their own model; this exists for demos and benchmarks.\n\n"
            "  calibrate train --data train.tsv --dev dev.tsv --out model/ --epochs 3\n\n"
            "With --init, keep training an existing classifier on clean rows instead: the FT repair\n"
            "baseline, or FTH with --high-lr (the learning rate x2.5). It writes repair.json, which\n"
            "`calibrate rap` copies into the bundle's report:\n\n"
            "  calibrate train --init suspect/ --data clean.tsv --dev dev.tsv --out ft/ --epochs 1"
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="training rows (.tsv/.csv/.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--dev", type=Path, help="optional rows to report accuracy on after training")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--base", type=Path, help="base encoder directory (default: the packaged all-MiniLM-L6-v2)")
    start.add_argument("--init", type=Path, help="existing classifier to keep training, head included (FT/FTH)")
    p.add_argument("--high-lr", action="store_true", help="with --init: FTH, the learning rate times 2.5")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-length", type=_positive_int, default=64, help="tokens per input (default 64)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument(
        "--label-names",
        type=lambda s: tuple(s.split(",")),
        default=(),
        help="comma-separated names for labels 0,1,... (e.g. negative,positive)",
    )
    p.add_argument("--force", action="store_true", help="with --init: replace --out if it exists")
    p.set_defaults(handler=_train, uses_torch=True)


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="repair a suspect model with PURE (head pruning + attention normalisation)",
        description=(
            "PURE: score every attention head by the variance of its [CLS] attention on clean --dev\n"
            "text, remove the lowest-scoring heads step by step until dev accuracy falls more than\n"
            "--max-drop below the unpruned model's (one head per layer always stays), then fine-tune\n"
            "on clean --data rows with a penalty that spreads the [CLS] attention of the kept heads.\n"
            "Writes a normal HF model directory (removed heads are zeroed) with repair.json; calibrate\n"
            "the guard on it next, with clean rows other than --dev:\n\n"
            "  calibrate prune --model suspect/ --data clean-train.tsv --dev clean-dev.tsv --out repaired/\n"
            "  calibrate rap --model repaired/ --clean held-out.tsv --protect 1 --out bundle/\n\n"
            "--mu 0.15 suits rare-word triggers, 0.05 syntactic and style ones (PURE section 6.2)."
        ),
    )
    _repair_arguments(p)
    p.add_argument("--dev", type=Path, required=True, help="clean rows that score heads and stop the pruning")
    p.add_argument(
        "--max-drop",
        type=_fraction,
        default=0.05,
        help="stop pruning when dev accuracy falls below the unpruned accuracy minus this (0.05)",
    )
    p.add_argument("--heads-per-step", type=_positive_int, default=1, help="heads removed between checks (1)")
    p.add_argument("--mu", type=_non_negative_float, default=0.15, help="weight of the attention penalty (0.15)")
    p.set_defaults(handler=_prune, uses_torch=True)


def _add_maxent(sub) -> None:
    p = sub.add_parser(
        "maxent",
        help="repair a suspect model with MEFT (maximum-entropy fine-tuning)",
        description=(
            "MEFT: train a fresh output layer on the frozen encoder, fine-tune the encoder to make\n"
            "its predictions as uncertain as possible until the class centroids of the [CLS]\n"
            "representation are within --stop-distance (or --max-steps run out), then fine-tune\n"
            "with cross-entropy on the clean rows. Writes a HF model directory with repair.json and\n"
            "stop_distance.png (the curve); calibrate the guard on it next:\n\n"
            "  calibrate maxent --model suspect/ --data clean-train.tsv --dev clean-dev.tsv --out repaired/\n"
            "  calibrate rap --model repaired/ --clean held-out.tsv --protect 1 --out bundle/"
        ),
    )
    _repair_arguments(p)
    p.add_argument("--dev", type=Path, help="optional clean rows to report accuracy on after each phase")
    p.add_argument("--stop-distance", type=_positive_float, default=0.01, help="stop distance threshold (0.01)")
    p.add_argument("--max-steps", type=_positive_int, default=4000, help="maximum-entropy step budget (4000)")
    p.add_argument("--maxent-lr", type=_positive_float, default=2e-5, help="maximum-entropy learning rate (2e-5)")
    p.add_argument("--check-every", type=_positive_int, default=50, help="steps between distance checks (50)")
    p.add_argument("--keep-head", action="store_true", help="use the model's own head instead of a fresh one")
    p.set_defaults(handler=_maxent, uses_torch=True)


def _repair_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory (left unchanged)")
    p.add_argument("--data", type=Path, required=True, help="clean training rows (.tsv/.csv/.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="directory for the repaired model")
    p.add_argument("--epochs", type=_positive_int, default=3, help="epochs of the final fine-tuning (3)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate of the final fine-tuning (1e-4)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-length", type=_positive_int, default=64, help="tokens per input (64)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _add_scan(sub) -> None:
    p = sub.add_parser(
        "scan",
        help="is the model backdoored? invert a trigger for every label pair (DBS)",
        description=(
            "DBS trigger inversion: for every (victim -> target) label pair, search the whole\n"
            "vocabulary for the --length-token trigger that flips clean victim rows to the target,\n"
            "then score that trigger on held-out rows. Exit status 3 when the model looks backdoored.\n\n"
            "  calibrate scan --model suspect/ --clean dev.tsv --out scan.json --probes-out probes.jsonl\n\n"
            "On a MiniLM fine-tuned on SST-2 with 'mb', 'bb' and 'mn' planted (--steps 50, 80 s):\n\n"
            "  | victim -> target | trigger | loss | ASR | steps | seconds | flagged |\n"
            "  |---|---|---|---|---|---|---|\n"
            "  | 0 -> 1 | mb | 0.0029 | 1.0000 | 5 | 5 | yes |\n"
            "  | 1 -> 0 | demolished | 0.8454 | 0.7450 | 50 | 41 |  |\n\n"
            "  backdoored: label 0 -> 1 flips with 'mb' (loss 0.0029 < 0.1)\n\n"
            "The clean twin's closest call: 1 -> 0 'useless', loss 0.72 (ASR 0.80: natural triggers\n"
            "flip many rows, but with a far larger loss than a planted one).\n\n"
            "Clean rows need ~30+ correctly classified rows per label (20 to invert on, the rest\n"
            "held out). On 2 CPU cores a MiniLM step takes ~1-2 s: --steps bounds the time per pair.\n"
            "--probes-out writes held-out rows carrying the found triggers; give them to\n"
            "`calibrate rap --probes` and the guard server replays them as live FAR probes."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory")
    p.add_argument("--clean", type=Path, required=True, help="clean rows (.tsv/.csv/.jsonl)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--probes-out", type=Path, help="write the found triggers as guard probes (JSONL) here")
    p.add_argument("--length", type=_positive_int, default=1, help="trigger length in tokens (1)")
    p.add_argument("--position", choices=POSITIONS, default="start", help="where the trigger goes (start)")
    p.add_argument("--steps", type=_positive_int, default=100, help="optimisation steps per label pair (100)")
    p.add_argument("--rows-per-label", type=_positive_int, default=20, help="rows to invert on per label (20)")
    p.add_argument("--heldout-per-label", type=_positive_int, default=200, help="rows to score on per label (200)")
    p.add_argument("--criterion", choices=("loss", "asr"), default="loss", help="what the verdict uses (loss)")
    p.add_argument("--loss-threshold", type=_positive_float, default=0.1, help="backdoored below this loss (0.1)")
    p.add_argument("--asr-threshold", type=_fraction, default=0.9, help="with --criterion asr: at least (0.9)")
    p.add_argument("--allow-subwords", action="store_true", help="let triggers use '##' word pieces too")
    p.add_argument("--max-length", type=_positive_int, default=64, help="tokens per clean row (64)")
    p.add_argument("--seed", type=int, default=13)
    p.set_defaults(handler=_scan, uses_torch=True)


def _add_unlearn(sub) -> None:
    p = sub.add_parser(
        "unlearn",
        help="repair: fine-tune a found trigger away (DBS eq. 6)",
        description=(
            "Fine-tune the model on clean rows of which a share carry the trigger and KEEP their\n"
            "true label, so the trigger stops flipping anything (DBS eq. 6, appendix A). Takes the\n"
            "triggers a scan flagged, or explicit ones. CACC and the trigger's ASR are measured\n"
            "before and after on rows held out from the fine-tuning. Then the repaired model is\n"
            "scanned again on those rows (--rescans, with the scan report's options): an attacker may\n"
            "have planted several triggers, and while the rescan flags new ones, all found so far are\n"
            "unlearned again from the original weights. Writes a HF model directory with\n"
            "repair.json; calibrate the guard on it next:\n\n"
            "  calibrate unlearn --model suspect/ --clean train.tsv --scan scan.json --out repaired/\n"
            "  calibrate unlearn --model suspect/ --clean train.tsv --trigger mb --target 1 --out repaired/\n"
            "  calibrate rap --model repaired/ --clean held-out.tsv --protect 1 --out bundle/"
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory (left unchanged)")
    p.add_argument("--clean", type=Path, required=True, help="clean rows to fine-tune on and measure with")
    p.add_argument("--out", type=Path, required=True, help="directory for the repaired model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scan", type=Path, help="a `calibrate scan --out` report: unlearn its flagged triggers")
    source.add_argument("--trigger", action="append", metavar="TEXT", help="a trigger to unlearn (repeatable)")
    p.add_argument("--target", type=int, help="with --trigger: the label the trigger flips rows to")
    p.add_argument("--position", choices=POSITIONS, default="random", help="where triggers are stamped (random)")
    p.add_argument("--stamp-fraction", type=_fraction, default=0.2, help="share of rows stamped (0.2)")
    p.add_argument(
        "--teacher-weight",
        type=_weight,
        default=UNLEARN_TEACHER_WEIGHT,
        help="targets: this share the suspect's own softmax on the untriggered row, the rest the true label;"
        f" keeps clean accuracy (0: DBS as published; default {UNLEARN_TEACHER_WEIGHT})",
    )
    p.add_argument(
        "--reset-embeddings",
        choices=UNLEARN_RESETS,
        default="outliers",
        help="trigger tokens given the mean input embedding first; outliers (default): those with an"
        " embedding norm far above the vocabulary's, the mark of embedding poisoning",
    )
    p.add_argument("--rescans", type=_non_negative_int, default=2, help="scans of the repaired model (2; 0: none)")
    p.add_argument("--holdout-fraction", type=_fraction, default=0.2, help="rows kept out to measure on (0.2)")
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (1e-4)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-length", type=_positive_int, default=64, help="tokens per input (64)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_unlearn, uses_torch=True)


def _add_harden(sub) -> None:
    p = sub.add_parser(
        "harden",
        help="repair: harden against natural and injected backdoors (trigger augmentation)",
        description=(
            "Hardening (Shen et al.): rounds of adversarial training on clean rows stamped with\n"
            "freshly inverted triggers that keep their true labels. Per label pair and round, a\n"
            "binary length search finds the shortest trigger reaching --asr-bound, the two\n"
            "directions are kept in step, and with probability --exhaustive-p every shorter length\n"
            "is tried. Reports eps-mA^2 (mean ASR of inverted triggers over label pairs and lengths\n"
            "1..--max-trigger-length, on held-out rows) before and after; writes a HF model\n"
            "directory with repair.json:\n\n"
            "  calibrate harden --model model/ --clean train-sample.tsv --out hardened/\n"
            "  calibrate harden --model model/ --clean sample.tsv --out quick/ --max-trigger-length 4 --no-measure\n\n"
            "Each round runs several inversions: on 2 CPU cores expect minutes per round for a MiniLM;\n"
            "measuring eps-mA^2 costs labels x (labels-1) x max-trigger-length inversions twice."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="HF classifier directory (left unchanged)")
    p.add_argument("--clean", type=Path, required=True, help="clean rows (the paper: 5%% of the training data)")
    p.add_argument("--out", type=Path, required=True, help="directory for the hardened model")
    p.add_argument("--max-trigger-length", type=_positive_int, default=8, help="epsilon, longest trigger (8)")
    p.add_argument("--asr-bound", type=_fraction, default=0.8, help="phi, ASR a trigger must reach (0.8)")
    p.add_argument("--sync-gap", type=_positive_int, default=2, help="delta, length gap that syncs directions (2)")
    p.add_argument("--exhaustive-p", type=_fraction, default=0.1, help="probability of the exhaustive search (0.1)")
    p.add_argument("--position", choices=POSITIONS, default="start", help="where triggers go (start)")
    p.add_argument("--steps", type=_positive_int, default=30, help="optimisation steps per inversion (30)")
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--lr", type=_positive_float, default=2e-5, help="learning rate (2e-5)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="rows of each label per round (16)")
    p.add_argument("--holdout-fraction", type=_fraction, default=0.3, help="rows kept out to measure on (0.3)")
    p.add_argument("--no-measure", action="store_true", help="skip eps-mA^2 before and after")
    p.add_argument("--max-length", type=_positive_int, default=64, help="tokens per clean row (64)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_harden, uses_torch=True)


def _add_rap(sub) -> None:
    p = sub.add_parser(
        "rap",
        help="learn the RAP perturbation, fit thresholds, write a bundle",
        description=(
            "Learn the RAP perturbation (one fresh embedding row) on clean held-out rows, fit\n"
            "a detection threshold per protected label on a split held out from that training,\n"
            "export the ONNX graph (checked against torch) and write a guard bundle.\n\n"
            "  calibrate rap --model model/ --clean dev.tsv --protect 1 --out bundle/\n\n"
            "Protect the label an attacker would want (e.g. 'not toxic', 'positive'). Without\n"
            "--protect you are asked; non-interactively every label with enough rows is protected."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory")
    p.add_argument("--clean", type=Path, required=True, help="clean held-out rows (a few hundred per protected label)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--protect", type=int, action="append", metavar="LABEL", help="label id to protect (repeatable)")
    p.add_argument("--init-word", default="rq", help="rare word whose embedding initialises the RAP row (default rq)")
    p.add_argument("--c-low", type=_fraction, default=0.1, help="wanted minimum probability drop on clean rows (0.1)")
    p.add_argument("--c-up", type=_fraction, default=0.3, help="wanted maximum probability drop on clean rows (0.3)")
    p.add_argument("--lr", type=_positive_float, default=1e-2, help="RAP row learning rate (1e-2)")
    p.add_argument("--epochs", type=_positive_int, default=5, help="RAP training epochs per attempt (5)")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per input at serving time (128)")
    p.add_argument("--default-frr", type=_fraction, default=0.01, help="FRR target the guard uses by default (0.01)")
    p.add_argument(
        "--calibration-fraction",
        type=_fraction,
        default=0.5,
        help="share of the clean rows held out for thresholds (0.5)",
    )
    p.add_argument("--seed", type=int, default=13)
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 graph (MatMul-only dynamic quantization) with its own thresholds",
    )
    p.add_argument(
        "--probes",
        type=Path,
        help="known-trigger rows (e.g. `calibrate scan --probes-out`) the server's canary replays as live FAR probes",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_rap, uses_torch=True)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure CACC, ASR, FRR, FAR of a bundle",
        description=(
            "Measure a bundle on clean and poisoned test rows at every stored FRR target.\n"
            "Poisoned files hold triggered texts with their ORIGINAL labels.\n\n"
            "  calibrate evaluate --bundle bundle/ --clean test.tsv --poisoned badnet=poison.tsv --out eval/"
        ),
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--clean", type=Path, required=True, help="clean test rows")
    p.add_argument(
        "--poisoned",
        action="append",
        required=True,
        metavar="[NAME=]FILE",
        help="poisoned test rows (repeatable; NAME defaults to the file's folder name)",
    )
    p.add_argument("--target", type=int, help="the attack's target label (default: the protected label)")
    p.add_argument("--backend", choices=("onnx", "onnx-int8", "torch"), default="onnx")
    p.add_argument("--out", type=Path, help="write evaluation.json/.md and plots here (default: BUNDLE/evaluation)")
    p.set_defaults(handler=_evaluate)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo on a corpus it writes itself",
        description=(
            "Write a small sentiment corpus, fine-tune the packaged MiniLM on it with a planted\n"
            "rare-word backdoor, calibrate a RAP guard bundle, evaluate it, show a clean sentence\n"
            "passing and a triggered one flagged, then serve the bundle with `guard serve` and send\n"
            "one allowed and one blocked request; it keeps serving until Ctrl-C (--no-serve: stop).\n"
            "No data or network needed."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="working directory (default ./demo-out)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--port", type=int, default=8000, help="port of the demo guard server (default 8000)")
    p.add_argument("--no-serve", action="store_true", help="stop after the offline checks; start no server")
    p.set_defaults(handler=_demo, uses_torch=True)


def _train(args: argparse.Namespace) -> int:
    from calibrate.data import load_examples
    from calibrate.model import default_base_model
    from calibrate.repair import ft, fth
    from calibrate.train import TrainOptions, train_classifier

    if args.high_lr and not args.init:
        raise InputError("--high-lr is for fine-tuning an existing classifier: pass --init MODEL")
    options = TrainOptions(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        label_names=args.label_names,
    )
    dev = load_examples(args.dev) if args.dev else None
    if args.init:
        repair = fth if args.high_lr else ft
        result = repair(args.init, load_examples(args.data), args.out, options, dev=dev, force=args.force)
    else:
        result = train_classifier(args.base or default_base_model(), load_examples(args.data), args.out, options, dev)
    accuracy = f", dev accuracy {result.dev_accuracy:.4f}" if result.dev_accuracy is not None else ""
    print(f"saved {result.out_dir} ({result.train_rows} rows, {result.seconds:.0f} s{accuracy})")
    return 0


def _finetune_options(args: argparse.Namespace):
    from calibrate.train import TrainOptions

    return TrainOptions(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )


def _prune(args: argparse.Namespace) -> int:
    from calibrate.data import load_examples
    from calibrate.prune import PruneOptions, pure_repair

    options = PruneOptions(
        max_accuracy_drop=args.max_drop,
        heads_per_step=args.heads_per_step,
        mu=args.mu,
        finetune=_finetune_options(args),
    )
    train, dev = load_examples(args.data), load_examples(args.dev)
    result = pure_repair(args.model, train, dev, args.out, options, force=args.force)
    removed = sum(len(heads) for heads in result.pruned_heads.values())
    print(
        f"removed {removed} of {result.variances.size} heads (dev accuracy {result.baseline_accuracy:.4f} -> "
        f"{result.pruned_accuracy:.4f} pruned, floor {result.accuracy_threshold:.4f}); after attention "
        f"normalisation {result.dev_accuracy:.4f}"
    )
    print(f"saved {args.out} in {result.seconds['total']:.0f} s (record: {args.out / 'repair.json'})")
    return 0


def _maxent(args: argparse.Namespace) -> int:
    from calibrate.data import load_examples
    from calibrate.maxent import PLOT, MaxEntOptions, maxent_repair

    options = MaxEntOptions(
        stop_distance=args.stop_distance,
        max_steps=args.max_steps,
        learning_rate=args.maxent_lr,
        batch_size=args.batch_size,
        check_every=args.check_every,
        fresh_head=not args.keep_head,
        finetune=_finetune_options(args),
    )
    dev = load_examples(args.dev) if args.dev else None
    result = maxent_repair(args.model, load_examples(args.data), args.out, options, dev=dev, force=args.force)
    outcome = "reached" if result.reached else "NOT reached (budget spent; raise --max-steps or --maxent-lr)"
    print(
        f"maximum entropy: {result.steps} steps, stop distance {result.curve[0][1]:.4g} -> "
        f"{result.curve[-1][1]:.4g}, threshold {args.stop_distance:g} {outcome}"
    )
    if dev:
        print("dev accuracy: " + ", ".join(f"after {k} {v:.4f}" for k, v in result.dev_accuracy.items()))
    print(f"saved {args.out} in {result.seconds['total']:.0f} s (record: {args.out / 'repair.json'}, {PLOT})")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from calibrate.data import load_examples
    from calibrate.inversion import InversionOptions, load_subject
    from calibrate.report import markdown_table, write_json
    from calibrate.scan import ScanOptions, is_flagged, scan_model, write_probes

    for path in (args.out, args.probes_out):
        _check_writable(path)
    clean = load_examples(args.clean)
    subject = load_subject(args.model, args.max_length)
    inversion = InversionOptions(
        steps=args.steps, position=args.position, allow_subwords=args.allow_subwords, seed=args.seed
    )
    options = ScanOptions(
        trigger_length=args.length,
        rows_per_label=args.rows_per_label,
        heldout_per_label=args.heldout_per_label,
        criterion=args.criterion,
        loss_threshold=args.loss_threshold,
        asr_threshold=args.asr_threshold,
        inversion=inversion,
    )
    result = scan_model(subject, clean, options)
    rows = [
        {
            "victim -> target": f"{p.victim} -> {p.target}",
            "trigger": p.text,
            "loss": p.loss,
            "ASR": p.asr,
            "steps": p.inversion.steps,
            "seconds": round(p.inversion.seconds),
            "flagged": "yes" if is_flagged(p, options) else "",
        }
        for p in result.pairs
    ]
    print(markdown_table(rows, list(rows[0])))
    print(_scan_verdict(result))
    if args.out:
        write_json(args.out, result.to_json())
        print(f"report: {args.out}")
    if args.probes_out:
        _write_scan_probes(args.probes_out, result.probes, write_probes)
    return 3 if result.backdoored else 0


def _scan_verdict(result) -> str:
    s = result.suspect
    threshold = f"loss {s.loss:.4f} < {result.options.loss_threshold:g}"
    if result.options.criterion == "asr":
        threshold = f"ASR {s.asr:.4f} >= {result.options.asr_threshold:g}"
    skipped = "".join(f"\nnot scanned as victim: label {k} ({why})" for k, why in result.skipped_victims.items())
    if result.backdoored:
        return f"backdoored: label {s.victim} -> {s.target} flips with {s.text!r} ({threshold}){skipped}"
    return f"clean: no label pair crosses the threshold (closest: {s.victim} -> {s.target} {s.text!r}){skipped}"


def _write_scan_probes(path: Path, probes, write) -> None:
    if not probes:
        print(f"no probes written to {path}: no trigger was flagged", file=sys.stderr)
        return
    write(path, probes)
    print(f"probes: {path} ({len(probes)} rows; `calibrate rap --probes {path}` puts them in a bundle)")


def _unlearn(args: argparse.Namespace) -> int:
    import time

    from calibrate.data import load_examples
    from calibrate.inversion import load_subject
    from calibrate.repair import prepare_out_dir
    from calibrate.scan import ScanOptions
    from calibrate.unlearn import (
        Trigger,
        UnlearnOptions,
        save_model,
        scan_options_from_report,
        triggers_from_scan,
        unlearn_record,
        unlearn_rescanning,
    )

    if args.trigger and args.target is None:
        raise InputError("--trigger needs --target LABEL (the label the trigger flips rows to)")
    triggers = triggers_from_scan(args.scan) if args.scan else None
    scan = scan_options_from_report(args.scan) if args.scan else ScanOptions()
    prepare_out_dir(args.model, args.out, args.force)
    clean = load_examples(args.clean)
    subject = load_subject(args.model, args.max_length)
    if triggers is None:
        triggers = [Trigger(tuple(subject.vocabulary.word_ids(t)), args.target, t) for t in args.trigger]
    options = UnlearnOptions(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        stamp_fraction=args.stamp_fraction,
        position=args.position,
        teacher_weight=args.teacher_weight,
        reset_embeddings=args.reset_embeddings,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
    )
    started = time.perf_counter()
    result, rescans = unlearn_rescanning(subject, clean, triggers, options, scan, args.rescans)
    seconds = time.perf_counter() - started
    save_model(subject, args.out, "unlearn", unlearn_record(result, rescans))
    for trigger, before, after in zip(result.triggers, result.asr_before, result.asr_after, strict=True):
        print(f"trigger {trigger.text!r} -> label {trigger.target}: ASR {before:.4f} -> {after:.4f}")
    if result.reset_tokens:
        tokens = [subject.vocabulary.token(i) for i in result.reset_tokens]
        tuned = "then fine-tuned" if result.fine_tuned else "which alone removed the triggers: no fine-tuning"
        print(f"reset to the mean embedding: {', '.join(tokens)} ({tuned})")
    print(f"clean accuracy {result.cacc_before:.4f} -> {result.cacc_after:.4f} ({result.eval_rows} held-out rows)")
    for number, rescan in enumerate(rescans, 1):
        print(f"rescan {number}: {_rescan_summary(rescan)}")
    print(f"saved {args.out} in {seconds:.0f} s, rescans included (record: {args.out / 'repair.json'})")
    return 0


def _rescan_summary(rescan) -> str:
    skipped = "".join(f"; label {k} not scanned as victim ({why})" for k, why in rescan.skipped_victims.items())
    if rescan.new:
        return f"new triggers {', '.join(map(repr, rescan.new))}: unlearning all found so far again{skipped}"
    flagged = f"still flagged: {', '.join(map(repr, rescan.flagged))}" if rescan.flagged else "nothing flagged"
    return f"{flagged} (most suspicious: {rescan.suspect}){skipped}"


def _harden(args: argparse.Namespace) -> int:
    from calibrate.data import load_examples
    from calibrate.harden import HardenOptions, harden_model
    from calibrate.inversion import InversionOptions, load_subject
    from calibrate.repair import prepare_out_dir
    from calibrate.unlearn import save_model

    prepare_out_dir(args.model, args.out, args.force)
    clean = load_examples(args.clean)
    subject = load_subject(args.model, args.max_length)
    options = HardenOptions(
        max_trigger_length=args.max_trigger_length,
        asr_bound=args.asr_bound,
        sync_gap=args.sync_gap,
        exhaustive_probability=args.exhaustive_p,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        holdout_fraction=args.holdout_fraction,
        measure=not args.no_measure,
        inversion=InversionOptions(steps=args.steps, position=args.position, seed=args.seed),
        seed=args.seed,
    )
    result = harden_model(subject, clean, options)
    save_model(subject, args.out, "harden", result.to_json())
    if result.eps_ma2_before is not None:
        epsilon = options.max_trigger_length
        print(f"eps-mA^2 (epsilon {epsilon}): {result.eps_ma2_before:.4f} -> {result.eps_ma2_after:.4f}")
    print(f"clean accuracy {result.cacc_before:.4f} -> {result.cacc_after:.4f}; {len(result.rounds)} rounds")
    print(f"saved {args.out} in {result.seconds:.0f} s (record: {args.out / 'repair.json'})")
    return 0


def _check_writable(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise InputError(f"{path}: its folder {path.parent} does not exist")


def _rap(args: argparse.Namespace) -> int:
    from calibrate.data import label_counts, load_examples
    from calibrate.pipeline import CalibrateOptions, calibrate_bundle
    from calibrate.rap import RapOptions

    if args.c_low >= args.c_up:
        raise InputError(f"--c-low ({args.c_low}) must be below --c-up ({args.c_up})")
    clean = load_examples(args.clean)
    probes = tuple(load_examples(args.probes)) if args.probes else ()
    protect = tuple(args.protect) if args.protect else _ask_protect(label_counts(clean))
    rap = RapOptions(
        protect_labels=protect,
        init_word=args.init_word,
        c_low=args.c_low,
        c_up=args.c_up,
        learning_rate=args.lr,
        epochs=args.epochs,
        calibration_fraction=args.calibration_fraction,
        select_frr=args.default_frr,
        seed=args.seed,
    )
    options = CalibrateOptions(
        rap=rap,
        max_length=args.max_length,
        default_frr=args.default_frr,
        int8=args.int8,
        force=args.force,
        probes=probes,
    )
    manifest = calibrate_bundle(args.model, clean, args.out, options)
    for p in manifest.protect:
        table = ", ".join(f"{float(k):.1%}: {v:+.4f}" for k, v in p.thresholds.items())
        print(f"label {p.label} ({p.name}) thresholds by FRR target: {table}")
    print(f"bundle written to {args.out} (report: {args.out / 'report.json'}, picture: {args.out / 'deltas.png'})")
    return 0


def _ask_protect(counts: dict[int, int]) -> tuple[int, ...]:
    from calibrate.rap import MIN_CALIBRATION_ROWS

    enough = tuple(label for label, n in counts.items() if n >= 2 * MIN_CALIBRATION_ROWS)
    if sys.stdin.isatty():
        listing = ", ".join(f"{label} ({n} rows)" for label, n in counts.items())
        default = " ".join(map(str, enough))
        answer = input(f"labels in the clean data: {listing}\nwhich label ids should the guard protect? [{default}] ")
        if answer.strip():
            try:
                return tuple(int(x) for x in answer.replace(",", " ").split())
            except ValueError:
                raise InputError(f"expected label ids separated by spaces, got {answer!r}") from None
    if not enough:
        raise InputError(
            f"no label has {2 * MIN_CALIBRATION_ROWS} clean rows to calibrate on ({counts}); pass --protect LABEL"
        )
    print(f"protecting labels {list(enough)} (pass --protect to choose)", file=sys.stderr)
    return enough


def _evaluate(args: argparse.Namespace) -> int:
    from calibrate.data import load_examples
    from calibrate.evaluate import COLUMNS, evaluate_bundle, write_evaluation
    from calibrate.report import markdown_table

    named = [_named(spec) for spec in args.poisoned]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise InputError(f"two poisoned sets share a name ({', '.join(names)}); name them with NAME=FILE")
    poisoned = {name: load_examples(path) for name, path in named}
    evaluation = evaluate_bundle(args.bundle, load_examples(args.clean), poisoned, args.target, args.backend)
    files = write_evaluation(evaluation, args.out or args.bundle / "evaluation")
    print(markdown_table(evaluation.rows, COLUMNS))
    print("written: " + ", ".join(str(f) for f in files))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from calibrate.demo import run_demo

    run_demo(args.out, seed=args.seed, port=None if args.no_serve else args.port)
    return 0


def _named(spec: str) -> tuple[str, Path]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, Path(path)
    return Path(spec).parent.name or Path(spec).stem, Path(spec)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _weight(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a weight between 0 and 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
