"""`calibrate scan | unlearn | harden`: DBS trigger inversion and the repairs built on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate.cli.args import (
    add_learning_rate,
    command,
    defaults,
    fraction,
    non_negative_int,
    options_from,
    positive_float,
    positive_int,
    weight,
)
from calibrate.inversion.options import (
    CRITERIA,
    POSITIONS,
    RESET_MODES,
    HardenJob,
    HardenOptions,
    InversionOptions,
    ScanJob,
    ScanOptions,
    UnlearnJob,
    UnlearnOptions,
)

UNLEARN_RESETS = RESET_MODES
UNLEARN_TEACHER_WEIGHT = defaults(UnlearnOptions).teacher_weight

SCAN = (
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
)
UNLEARN = (
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
)
HARDEN = (
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
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_scan(sub)
    _add_unlearn(sub)
    _add_harden(sub)


def _add_scan(sub: argparse._SubParsersAction) -> None:
    d, inv, job = defaults(ScanOptions), defaults(InversionOptions), defaults(ScanJob)
    p = command(sub, "scan", "is the model backdoored? invert a trigger for every label pair (DBS)", SCAN)
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory")
    p.add_argument("--clean", type=Path, required=True, help="clean rows (.tsv/.csv/.jsonl)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--probes-out", type=Path, help="write the found triggers as guard probes (JSONL) here")
    p.add_argument(
        "--length",
        dest="trigger_length",
        metavar="LENGTH",
        type=positive_int,
        default=d.trigger_length,
        help="trigger length in tokens",
    )
    p.add_argument("--position", choices=POSITIONS, default=inv.position, help="where the trigger goes")
    p.add_argument("--steps", type=positive_int, default=inv.steps, help="optimisation steps per label pair")
    p.add_argument("--rows-per-label", type=positive_int, default=d.rows_per_label, help="rows to invert on per label")
    p.add_argument(
        "--heldout-per-label", type=positive_int, default=d.heldout_per_label, help="rows to score on per label"
    )
    p.add_argument("--criterion", choices=CRITERIA, default=d.criterion, help="what the verdict uses")
    p.add_argument("--loss-threshold", type=positive_float, default=d.loss_threshold, help="backdoored below this loss")
    p.add_argument("--asr-threshold", type=fraction, default=d.asr_threshold, help="with --criterion asr: at least")
    p.add_argument("--allow-subwords", action="store_true", help="let triggers use '##' word pieces too")
    p.add_argument("--max-length", type=positive_int, default=job.max_length, help="tokens per clean row")
    p.add_argument("--seed", type=int, default=inv.seed, help="random seed")
    p.set_defaults(handler=_scan, uses_torch=True)


def _add_unlearn(sub: argparse._SubParsersAction) -> None:
    d, job = defaults(UnlearnOptions), defaults(UnlearnJob)
    p = command(sub, "unlearn", "repair: fine-tune a found trigger away (DBS eq. 6)", UNLEARN)
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory (left unchanged)")
    p.add_argument("--clean", type=Path, required=True, help="clean rows to fine-tune on and measure with")
    p.add_argument("--out", type=Path, required=True, help="directory for the repaired model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scan", type=Path, help="a `calibrate scan --out` report: unlearn its flagged triggers")
    source.add_argument(
        "--trigger", dest="triggers", action="append", metavar="TEXT", help="a trigger to unlearn (repeatable)"
    )
    p.add_argument("--target", type=int, help="with --trigger: the label the trigger flips rows to")
    p.add_argument("--position", choices=POSITIONS, default=d.position, help="where triggers are stamped")
    p.add_argument("--stamp-fraction", type=fraction, default=d.stamp_fraction, help="share of rows stamped")
    p.add_argument(
        "--teacher-weight",
        type=weight,
        default=d.teacher_weight,
        help="targets: this share the suspect's own softmax on the untriggered row, the rest the true label;"
        " keeps clean accuracy (0: DBS as published)",
    )
    p.add_argument(
        "--reset-embeddings",
        choices=RESET_MODES,
        default=d.reset_embeddings,
        help="trigger tokens given the mean input embedding first; outliers: those with an"
        " embedding norm far above the vocabulary's, the mark of embedding poisoning",
    )
    rescans = "scans of the repaired model (0: none)"
    p.add_argument("--rescans", type=non_negative_int, default=job.rescans, help=rescans)
    p.add_argument("--holdout-fraction", type=fraction, default=d.holdout_fraction, help="rows kept out to measure on")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="fine-tuning epochs")
    add_learning_rate(p, d.learning_rate)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="rows per training step")
    p.add_argument("--max-length", type=positive_int, default=job.max_length, help="tokens per input")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_unlearn, uses_torch=True)


def _add_harden(sub: argparse._SubParsersAction) -> None:
    d, job = defaults(HardenOptions), defaults(HardenJob)
    help = "repair: harden against natural and injected backdoors (trigger augmentation)"
    p = command(sub, "harden", help, HARDEN)
    p.add_argument("--model", type=Path, required=True, help="HF classifier directory (left unchanged)")
    p.add_argument("--clean", type=Path, required=True, help="clean rows (the paper: 5%% of the training data)")
    p.add_argument("--out", type=Path, required=True, help="directory for the hardened model")
    p.add_argument(
        "--max-trigger-length", type=positive_int, default=d.max_trigger_length, help="epsilon, longest trigger"
    )
    p.add_argument("--asr-bound", type=fraction, default=d.asr_bound, help="phi, ASR a trigger must reach")
    p.add_argument("--sync-gap", type=positive_int, default=d.sync_gap, help="delta, length gap that syncs directions")
    p.add_argument(
        "--exhaustive-p",
        dest="exhaustive_probability",
        metavar="P",
        type=fraction,
        default=d.exhaustive_probability,
        help="probability of the exhaustive search",
    )
    p.add_argument("--position", choices=POSITIONS, default=d.inversion.position, help="where triggers go")
    p.add_argument("--steps", type=positive_int, default=d.inversion.steps, help="optimisation steps per inversion")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the training rows")
    add_learning_rate(p, d.learning_rate)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="rows of each label per round")
    p.add_argument("--holdout-fraction", type=fraction, default=d.holdout_fraction, help="rows kept out to measure on")
    p.add_argument("--no-measure", action="store_true", help="skip eps-mA^2 before and after")
    p.add_argument("--max-length", type=positive_int, default=job.max_length, help="tokens per clean row")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_harden, uses_torch=True)


def _scan(args: argparse.Namespace) -> int:
    from calibrate.inversion.scan import run_scan

    options = options_from(ScanOptions, args, inversion=options_from(InversionOptions, args))
    result = run_scan(options_from(ScanJob, args, options=options))
    return 3 if result.backdoored else 0


def _unlearn(args: argparse.Namespace) -> int:
    from calibrate.inversion.unlearn import run_unlearn

    triggers = tuple(args.triggers or ())
    run_unlearn(options_from(UnlearnJob, args, options=options_from(UnlearnOptions, args), triggers=triggers))
    return 0


def _harden(args: argparse.Namespace) -> int:
    from calibrate.inversion.harden import run_harden

    inversion = InversionOptions(steps=args.steps, position=args.position, seed=args.seed)
    options = options_from(HardenOptions, args, measure=not args.no_measure, inversion=inversion)
    run_harden(options_from(HardenJob, args, options=options))
    return 0
