"""`calibrate rap | evaluate`: the main flow, suspect model -> guard bundle, and its measurement."""

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
)
from calibrate.rap.options import (
    AUTO_READER,
    DEFAULT_LADDER,
    OBJECTIVES,
    OPTIMIZERS,
    PAPER_LADDER,
    CalibrateOptions,
    EvaluateJob,
    RapJob,
    RapOptions,
)
from guard.core.backends.base import BACKENDS
from guard.core.family import RAP_POSITIONS
from guard.core.rap import STATISTICS

RAP = (
    "Learn the RAP perturbation (one fresh embedding row) on clean held-out rows, fit\n"
    "a detection threshold per protected label on a split held out from that training,\n"
    "export the ONNX graph (checked against torch) and write a guard bundle.\n\n"
    "  calibrate rap --model model/ --clean dev.tsv --protect 1 --out bundle/\n"
    "  calibrate rap --model model/ --clean dev.tsv --protect 0 2 --out bundle/\n\n"
    "Protect the label an attacker would want (e.g. 'not toxic', 'positive'). Without\n"
    "--protect you are asked; non-interactively every label with enough rows is protected.\n\n"
    "Detectors: RAP, the feature detector (--no-features) and the reader, a clean model\n"
    "distilled from the suspect (--reader: by default the --reference-model or the packaged\n"
    "MiniLM when either has the suspect's vocabulary; the summary says which, or why none).\n"
    "--switch adds a fourth, against a backdoor taught to switch off when a rare token is\n"
    "inserted (RAP's own move): one more pass per protect-label row."
)
EVALUATE = (
    "Measure a bundle on clean and poisoned test rows at every stored FRR target.\n"
    "Poisoned files hold triggered texts with their ORIGINAL labels.\n\n"
    "  calibrate evaluate --bundle bundle/ --clean test.tsv --poisoned badnet=poison.tsv --out eval/"
)


def reference_model(text: str) -> Path:
    """--reference-model: a model folder, or `packaged` for the packaged MiniLM."""
    if text != "packaged":
        return Path(text)
    from calibrate.model import default_base_model

    return default_base_model()


def reader_base(text: str) -> Path | str | None:
    """--reader: auto, none, or a checkpoint as --reference-model takes it."""
    if text == AUTO_READER:
        return AUTO_READER
    return None if text == "none" else reference_model(text)


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_rap(sub)
    _add_evaluate(sub)


def _add_rap(sub: argparse._SubParsersAction) -> None:
    d, c = defaults(RapOptions), defaults(CalibrateOptions)
    p = command(sub, "rap", "learn the RAP perturbation, fit thresholds, write a bundle", RAP)
    p.add_argument("--model", type=Path, required=True, help="suspect HF classifier directory")
    p.add_argument("--clean", type=Path, required=True, help="clean held-out rows (a few hundred per protected label)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument(
        "--protect",
        type=int,
        nargs="+",
        action="extend",
        metavar="LABEL",
        help="label ids to protect (--protect 0 2, or repeated: --protect 0 --protect 2)",
    )
    p.add_argument("--init-word", default=d.init_word, help="rare word whose embedding initialises the RAP row")
    p.add_argument(
        "--rap-position",
        choices=RAP_POSITIONS,
        default=d.rap_position,
        help="where pass 2 inserts the RAP row: right before the trailing special token ([SEP], </s>: end) or "
        "right after the first one ([CLS], <s>: front, the paper's, and every bundle's before); a backdoor taught "
        "to switch off under a token at the front passes a front row, one taught at both ends passes either "
        "(bench/results/detection_matrix.md)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=d.objective,
        help="what the RAP row is trained for: a drop of the label's log-odds into --logodds-band (logodds: its "
        "gradient holds on confident models) or of its probability into [--c-low, --c-up] (paper: RAP as "
        "published, with a ladder of stronger attempts)",
    )
    p.add_argument(
        "--logodds-band",
        type=float,
        nargs=2,
        default=d.logodds_band,
        metavar=("LOW", "UP"),
        help="wanted log-odds drop on clean rows, in nats (objective logodds)",
    )
    p.add_argument("--c-low", type=fraction, default=d.c_low, help="wanted minimum probability drop (objective paper)")
    p.add_argument("--c-up", type=fraction, default=d.c_up, help="wanted maximum probability drop (objective paper)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer of the RAP row")
    add_learning_rate(p, d.learning_rate, "RAP row learning rate")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="RAP training epochs per attempt")
    p.add_argument(
        "--statistic",
        choices=STATISTICS,
        default=d.statistic,
        help="what the RAP score measures: minus the drop of the label's log-odds, counted "
        "from at least the label's floor (floored: a triggered input barely moves; the floor, the 10th "
        "percentile of its clean rows' log-odds, spares the unsure clean rows the perturbation pushes up); "
        "where the perturbed input's log-odds land (perturbed, the default before: an attacker who keeps "
        "triggered inputs as confident as clean ones passes it); the drop of p(label) (prob, the paper) or "
        "of its log-odds (logodds)",
    )
    p.add_argument("--max-length", type=positive_int, default=c.max_length, help="tokens per input at serving time")
    p.add_argument(
        "--classifier-max-length",
        type=positive_int,
        default=c.classifier_max_length,
        help="tokens the protected classifier reads, if more than --max-length (a sidecar in front of a "
        "512-token model): the guard checks the rest in windows",
    )
    p.add_argument("--default-frr", type=fraction, default=c.default_frr, help="FRR target the guard uses by default")
    p.add_argument(
        "--calibration-fraction",
        type=fraction,
        default=d.calibration_fraction,
        help="share of the clean rows held out for thresholds",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 graph (MatMul-only dynamic quantization) with its own thresholds",
    )
    p.add_argument(
        "--no-features",
        dest="features",
        action="store_false",
        help="leave out the feature detector (per-layer distance of [CLS] to the label's clean rows, "
        "outlier-norm tokens, and the flip scan: candidate tokens flagged when, inserted anywhere, they turn "
        "clean rows of other labels into a protect label and occur as a word in no clean row; rare-word "
        "triggers): the bundle then detects with RAP alone",
    )
    p.add_argument(
        "--reference-model",
        type=reference_model,
        metavar="DIR",
        help="the public checkpoint the suspect was fine-tuned from (a Hugging Face folder; 'packaged': the "
        "packaged MiniLM): tokens whose embedding row moved far more than fine-tuning moves any row are flagged "
        "(embedding poisoning that keeps the row's norm ordinary), and the flip scan tries the most-moved tokens "
        "(without a reference: the tokens a short DBS trigger search towards each protect label favours, which "
        "on moderation tasks also finds honest words absent from --clean)",
    )
    p.add_argument(
        "--reader",
        type=reader_base,
        default=c.reader,
        metavar="auto|none|packaged|DIR",
        help="the third detector's clean checkpoint, which must have the suspect's tokenizer (usually the one it "
        "was fine-tuned from): distilled from the suspect on the clean rows RAP trains on, it flags a protect-label "
        "prediction the suspect is far surer of than this clean reader (a backdoor trained to switch off under "
        "RAP's insertion; syntactic triggers); one more pass per protect-label row. auto (the default): the "
        "--reference-model, else the packaged MiniLM, whichever has the suspect's vocabulary, else no reader; "
        "none: leave it out",
    )
    p.add_argument(
        "--switch",
        action="store_true",
        default=c.switch,
        help="add the switch detector: one more pass inserts the RAP row's init word untrained where pass 2 puts "
        "the row, and flags a protect-label prediction whose log-odds fall far more than the clean rows' do (a "
        "backdoor trained to switch off under a rare insertion, which RAP lets through: bench/results/"
        "detection_matrix.md); off by default: it costs a pass of the model per protect-label row",
    )
    p.add_argument(
        "--reader-epochs", type=positive_int, default=c.reader_epochs, help="epochs of fine-tuning the --reader"
    )
    p.add_argument(
        "--reader-objective",
        choices=("labels", "distill"),
        default=c.reader_objective,
        help="what the --reader learns from the clean rows: their labels, or the suspect's probabilities on them "
        "(knowledge distillation: a trigger absent from the rows cannot pass into the reader)",
    )
    p.add_argument(
        "--reader-augment",
        type=non_negative_int,
        default=c.reader_augment,
        metavar="N",
        help="also distil the reader on N perturbed copies of each clean row (cut, masked and dropped words): "
        "it agrees with the suspect more closely, so its threshold is tighter; each epoch then sees N + 1 times "
        "the rows (lower --reader-epochs to keep the time)",
    )
    p.add_argument(
        "--reader-texts",
        type=Path,
        metavar="FILE",
        help="unlabeled in-domain texts the reader is also distilled on (a .txt file, one text per line, or a "
        "labelled data file as --clean takes, its labels unused), e.g. a few thousand requests of your own traffic. "
        "A triggered text among them would teach the reader the backdoor, so a first reader, trained on the clean "
        "rows alone, screens them: a text it flags at 20%% FRR is left out. The screen also drops the hard clean "
        "texts a reader learns most from; what each way catches: bench/results/detection_matrix.md (reader@texts*)",
    )
    p.add_argument(
        "--reader-texts-trusted",
        action="store_true",
        help="distil on every --reader-texts text, unscreened: for texts no attacker wrote to (collected before the "
        "suspect served, or an in-house corpus). They catch far more than screened ones (bench/results/"
        "detection_matrix.md, reader@texts-trusted), but one triggered text in a hundred teaches an unscreened "
        "reader the backdoor (reader@texts-dirty-trusted)",
    )
    p.add_argument(
        "--reader-lr",
        dest="reader_learning_rate",
        type=positive_float,
        default=c.reader_learning_rate,
        help="learning rate of fine-tuning the --reader",
    )
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="do not write the optimised graphs (model.opt.onnx, model.int8.opt.onnx: ONNX Runtime's transformer "
        "fusions, served when present)",
    )
    p.add_argument(
        "--keep-hf",
        action="store_true",
        help="also write hf/, the HF weights with the RAP row, for the torch backend (`guard check --backend "
        "torch`); serving (ONNX) does not need them and they double the bundle",
    )
    p.add_argument(
        "--probes",
        type=Path,
        help="known-trigger rows (e.g. `calibrate scan --probes-out`) the server's canary replays as live FAR probes",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_rap, uses_torch=True)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    d = defaults(EvaluateJob)
    p = command(sub, "evaluate", "measure CACC, ASR, FRR, FAR of a bundle", EVALUATE)
    p.add_argument("--bundle", type=Path, required=True, help="the guard bundle directory")
    p.add_argument("--clean", type=Path, required=True, help="clean test rows")
    p.add_argument(
        "--poisoned",
        action="append",
        required=True,
        metavar="[NAME=]FILE",
        help="poisoned test rows (repeatable; NAME defaults to the file's folder name)",
    )
    p.add_argument("--target", type=int, help="the attack's target label (default: the protected label)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="inference backend")
    p.add_argument("--out", type=Path, help="write evaluation.json/.md and plots here (default: BUNDLE/evaluation)")
    p.set_defaults(handler=_evaluate)


def _rap(args: argparse.Namespace) -> int:
    from calibrate.rap.build import run_rap

    protect = tuple(args.protect or ())
    ladder = PAPER_LADDER if args.objective == "paper" else DEFAULT_LADDER
    band = tuple(args.logodds_band)
    rap = options_from(
        RapOptions, args, protect_labels=protect, select_frr=args.default_frr, ladder=ladder, logodds_band=band
    )
    # run_rap loads --probes into probes, --reader-texts into reader_texts (and checks --reader-texts-trusted)
    options = options_from(CalibrateOptions, args, rap=rap, probes=(), reader_texts=(), reader_texts_trusted=False)
    run_rap(options_from(RapJob, args, options=options))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from calibrate.rap.evaluate import run_evaluate

    run_evaluate(options_from(EvaluateJob, args, poisoned=tuple(args.poisoned)))
    return 0
