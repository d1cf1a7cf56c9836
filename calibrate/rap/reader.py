"""`calibrate rap --reader BASE`: the reader detector's clean classifier (guard.core.reader).

BASE (a clean pre-trained checkpoint with the suspect's vocabulary, usually the one it was
fine-tuned from) is fine-tuned on the clean rows the RAP row trains on (every label) and any
unlabeled texts given (`--reader-texts`: distilled on, the more the lighter its clean tail), exported
to the bundle's reader graph, and the held-out rows are scored through the offline checker
(the server's steps) for the thresholds. It reads the suspect's token rows, so its vocabulary
must be the suspect's.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from calibrate.model import default_base_model, load_classifier, tokenizer_json, weights_sha256
from calibrate.options import TrainOptions
from calibrate.rap.export import export_onnx
from calibrate.rap.options import AUTO_READER, CalibrateOptions
from calibrate.rap.perturbation import RapResult, split_rows
from calibrate.rap.refit import label_scores
from calibrate.train import LossFn, cross_entropy, train_classifier
from guard.core.backends.onnx import OnnxBackend
from guard.core.bundle import READER_GRAPH, ReaderDetector
from guard.core.checker import Checker
from guard.core.detection import first_windows, flagged_texts
from guard.core.errors import InputError
from guard.core.runner import TwoPass
from guard.core.thresholds import threshold_at_frr
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example, LabelThresholds

log = logging.getLogger(__name__)
DISTILL_TEMPERATURE = 2.0
# --reader-texts are screened by a first reader (the clean rows'): a text it flags at this FRR of its own
# held-out rows is left out. On SST-2 adaptive-init with 100 triggered texts among 2,000 it dropped 23% of the
# clean protect-label texts and 79 of the 100 (at 50%: 52% and 90): a screen, not a guarantee
# (bench/results/detection_matrix.md, reader@texts-dirty)
SCREEN_FRR = 0.2


@dataclass(frozen=True)
class ReaderFit:
    info: ReaderDetector
    scores: dict[int, np.ndarray]  # protect label -> reader scores of its held-out rows, aligned with its RAP scores


@dataclass(frozen=True)
class ReaderChoice:
    base: Path | None  # None: no reader
    why: str  # how it was chosen, or why there is none (the report's and the summary's)


def choose_reader(options: CalibrateOptions, suspect_tokenizer: Path, work: Path) -> ReaderChoice:
    """The reader's base. An explicit path must have the suspect's vocabulary (refused otherwise);
    AUTO_READER tries the reference model, then the packaged MiniLM, and takes the first that has it."""
    if options.reader is None:
        return ReaderChoice(None, "left out by --reader none")
    if options.reader != AUTO_READER:
        base = Path(options.reader)
        check_vocabulary(base, suspect_tokenizer, work)
        return ReaderChoice(base, f"--reader {base}")
    candidates = [] if options.reference_model is None else [("the --reference-model", Path(options.reference_model))]
    with contextlib.suppress(InputError):  # not installed: nothing to try there
        candidates.append(("the packaged MiniLM", default_base_model()))
    for name, base in candidates:
        try:
            same = same_vocabulary(base, suspect_tokenizer, work)
        except InputError:  # no tokenizer to compare: not a reader for this suspect
            same = False
        if same:
            return ReaderChoice(base, f"auto: {name} has the suspect's vocabulary")
    tried = " or ".join(name for name, _ in candidates) or "no checkpoint"
    return ReaderChoice(
        None,
        f"auto: {tried} does not have the suspect's vocabulary, so there is no reader detector; a backdoor trained "
        "to switch off under RAP's insertion passes RAP (`--reader DIR`, the clean checkpoint the suspect was "
        "fine-tuned from, adds it)",
    )


def fit_reader(
    base: Path,
    clean: list[Example],
    result: RapResult,
    suspect_tokenizer: Path,
    staging: Path,
    options: CalibrateOptions,
    labels: int,
    suspect: PreTrainedModel | None = None,
) -> ReaderFit:
    """Train `base` into the reader and export it into `staging`; score the held-out rows of every protect label.

    With unlabeled texts (`options.reader_texts`) it is trained twice: first on the clean rows alone, then
    again on them and the texts that first reader does not flag at SCREEN_FRR (a triggered text the suspect
    is far surer of than a clean reader would teach the second one the backdoor); trusted texts
    (`reader_texts_trusted`) are all distilled on, in one training."""
    train, held = split_rows(clean, options.rap)
    present = {r.label for r in train}
    if max(present) + 1 != labels:
        raise InputError(f"the reader needs training rows of every label 0..{labels - 1}; the clean rows' training "
                         f"half has labels {sorted(present)}")  # fmt: skip
    train_options = TrainOptions(
        epochs=options.reader_epochs,
        learning_rate=options.reader_learning_rate,
        seed=options.rap.seed,
        max_length=options.max_length,
        progress=options.rap.progress,
    )
    teacher = suspect if options.reader_objective == "distill" else None
    rows = train + augmented(train, options.reader_augment, options.rap.seed, _mask_token(suspect_tokenizer))
    plain = RapTokenizer.from_file(suspect_tokenizer, None, options.max_length)
    kept = _readable(list(options.reader_texts), plain)
    if not (kept and options.reader_texts_trusted):  # the reader without texts, or the one that screens them
        _train_and_export(base, rows, staging, plain, train_options, teacher)
    if kept and not options.reader_texts_trusted:
        kept = _screened(kept, plain, staging, result, labels)
        log.info("reader: %d of %d unlabeled texts kept (the clean rows' reader flagged the rest at %.0f%% FRR)",
                 len(kept), len(options.reader_texts), 100 * SCREEN_FRR)  # fmt: skip
    if kept:
        unlabeled = [Example(text, 0) for text in kept]  # the label is unread: distillation
        _train_and_export(base, rows + unlabeled, staging, plain, train_options, teacher)
    model, reader = OnnxBackend(staging / "model.onnx"), OnnxBackend(staging / READER_GRAPH)
    try:
        scores = _held_out_scores(plain, model, reader, result, labels)
        texts = [r.text for r in held]
        suspect = _first(Checker(TwoPass(plain, {}, classes=labels), model).scores(texts)).argmax(axis=1)
        read = np.concatenate([reader.infer(plain.encode(texts[i : i + 32])) for i in range(0, len(texts), 32)])
    finally:
        model.close()
        reader.close()
    predicted = read.argmax(axis=1)
    info = ReaderDetector(
        base=str(base.resolve()),
        base_sha256=weights_sha256(base),
        train_rows=len(train),
        epochs=options.reader_epochs,
        objective=options.reader_objective,
        augment=options.reader_augment,
        texts=len(options.reader_texts),
        texts_kept=len(kept),
        texts_trusted=options.reader_texts_trusted,
        accuracy=float(np.mean(predicted == np.array([r.label for r in held]))),
        agreement=float(np.mean(predicted == suspect)),
    )
    log.info("reader: accuracy %.3f on %d held-out rows, agrees with the suspect on %.3f", info.accuracy, len(held),
             info.agreement)  # fmt: skip
    return ReaderFit(info, scores)


def _train_and_export(
    base: Path, rows: list[Example], staging: Path, plain: RapTokenizer, options: TrainOptions, teacher
) -> None:
    hf = staging / "reader-hf"
    train_reader(base, rows, hf, options, teacher)
    export_onnx(load_classifier(hf), plain, staging / READER_GRAPH, perturbed=False)
    shutil.rmtree(hf)


def _readable(texts: list[str], plain: RapTokenizer) -> list[str]:
    """The texts with a token the model reads (the guard refuses a request without one, e.g. a zero-width space)."""
    if not texts:
        return []
    readable = [text for text, row in zip(texts, plain.ids(texts), strict=True) if plain.reads_a_token(row)]
    if len(readable) < len(texts):
        log.warning("reader: %d of the unlabeled texts have no token the model reads; left out",
                    len(texts) - len(readable))  # fmt: skip
    return readable


def _held_out_scores(plain: RapTokenizer, model: OnnxBackend, reader: OnnxBackend, result: RapResult, labels: int):
    """Per protect label the reader scores of its held-out rows."""
    return {label: _scores(plain, model, reader, fit.texts, label, labels) for label, fit in result.fits.items()}


def _screened(texts: list[str], plain: RapTokenizer, staging: Path, result: RapResult, labels: int) -> list[str]:
    """The texts the staged reader (trained on the clean rows) does not flag at SCREEN_FRR of its own held-out
    rows, read as the server reads them (every window)."""
    model, reader = OnnxBackend(staging / "model.onnx"), OnnxBackend(staging / READER_GRAPH)
    try:
        held_out = _held_out_scores(plain, model, reader, result, labels)
        limits = {label: LabelThresholds(reader=threshold_at_frr(s, SCREEN_FRR)) for label, s in held_out.items()}
        flagged = flagged_texts(Checker(TwoPass(plain, limits, classes=labels), model, reader=reader).scores(texts),
                                limits)  # fmt: skip
    finally:
        model.close()
        reader.close()
    return [text for text, drop in zip(texts, flagged, strict=True) if not drop]


def train_reader(
    base: Path, rows: list[Example], out: Path, options: TrainOptions, teacher: PreTrainedModel | None = None
) -> None:
    """Fine-tune `base` (a fresh head) on `rows` into `out`: on their labels, or, with a `teacher` (the suspect),
    towards its probabilities (knowledge distillation at DISTILL_TEMPERATURE): on clean rows the suspect is
    the clean task's best teacher, and a trigger it was never shown cannot pass into the student."""
    how = "labels" if teacher is None else "the suspect's probabilities"
    log.info("training the reader from %s on %d rows' %s (%d epochs)", base, len(rows), how, options.epochs)
    train_classifier(base, rows, out, options, loss_fn=cross_entropy if teacher is None else distillation(teacher))


def augmented(rows: list[Example], copies: int, seed: int, mask: str | None) -> list[Example]:
    """`copies` perturbed copies of each row for distillation (Tang et al. 2019, "Distilling task-specific
    knowledge from BERT"): a quarter of them cut to a random run of a third or more of the words, then
    each word masked (p 0.1, with `mask`) or dropped (p 0.05). The teacher's probabilities on them show
    the student more of its clean function; they hold no word the rows lack, so no trigger either. The
    copies keep the row's label, which only a distillation ignores."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        for _ in range(copies):
            words = row.text.split()
            if len(words) > 3 and rng.random() < 0.25:
                n = rng.randint(max(1, len(words) // 3), len(words))
                start = rng.randint(0, len(words) - n)
                words = words[start : start + n]
            kept = []
            for word in words:
                r = rng.random()
                if r < 0.1 and mask is not None:
                    kept.append(mask)
                elif not 0.1 <= r < 0.15:
                    kept.append(word)
            out.append(Example(" ".join(kept) or row.text, row.label))
    return out


def _mask_token(tokenizer: Path) -> str | None:
    """The suspect tokenizer's mask token, if it has one of the usual spellings."""
    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab()
    return next((t for t in ("[MASK]", "<mask>") if t in vocab), None)


def distillation(teacher: PreTrainedModel, temperature: float = DISTILL_TEMPERATURE) -> LossFn:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al., 2015)."""
    teacher.eval()

    def loss(student: PreTrainedModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.softmax(teacher(**inputs).logits / temperature, dim=-1)
        log_probs = torch.log_softmax(student(**inputs).logits / temperature, dim=-1)
        return torch.nn.functional.kl_div(log_probs, target, reduction="batchmean") * temperature**2

    return loss


def _first(scores) -> np.ndarray:
    """Pass-1 probabilities of each text's first window."""
    return scores.probs[first_windows(scores.owner)]


def _scores(
    tokenizer: RapTokenizer, model: OnnxBackend, reader: OnnxBackend, texts: list[str], label: int, labels: int
) -> np.ndarray:
    """The reader scores of `texts` (held-out rows the suspect predicts as `label`), through the server's steps."""
    two_pass = TwoPass(tokenizer, dict.fromkeys(range(labels), LabelThresholds(reader=0.0)), classes=labels)
    return label_scores(two_pass, model, texts, label, "reader", reader)


def _vocabulary(base: Path, work: Path) -> dict[str, int]:
    try:
        return Tokenizer.from_file(str(tokenizer_json(base, work))).get_vocab()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def same_vocabulary(base: Path, suspect_tokenizer: Path, work: Path) -> bool:
    """Whether `base` maps every token to the id the suspect's tokenizer does (the reader reads its token rows)."""
    return _vocabulary(base, work) == Tokenizer.from_file(str(suspect_tokenizer)).get_vocab()


def check_vocabulary(base: Path, suspect_tokenizer: Path, work: Path) -> None:
    """An explicit --reader must have the suspect's vocabulary."""
    theirs, ours = _vocabulary(base, work), Tokenizer.from_file(str(suspect_tokenizer)).get_vocab()
    if theirs != ours:
        raise InputError(f"--reader {base}: its vocabulary ({len(theirs)} tokens) is not the suspect model's "
                         f"({len(ours)}); the reader reads the suspect's tokens, so pick the checkpoint the suspect "
                         "was fine-tuned from, or another of the same tokenizer")  # fmt: skip
