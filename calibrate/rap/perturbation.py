"""Learn the RAP perturbation token and fit per-label thresholds.

The perturbation is ONE embedding row appended to the model (id = old vocab
size), initialised from a rare word. Only that row is trained, with dropout off,
on clean rows of the protect label, to make them lose a set amount of that label
(RAP eq. 4): the objective's *drop* (of the probability or of the log-odds). The
held-out split is scored with the detection statistic (guard.core.rap: higher = more
suspicious), whose thresholds calibration fits once (guard.core.detection.fit_label).

Objectives:
- "logodds" (default): a hinge on the drop of the label's log-odds,
  logit_y - logsumexp(other logits), into `logodds_band` nats, with Adam. Its
  gradient does not vanish on a confident model, where p(y|x) ~ 0.996 for clean
  and triggered inputs alike; the paper's probability band has gradient
  p(1 - p) ~ 0.004 there and SGD left the row where it started (SST-2 BadNet-SL:
  in-range share 0.04 after 5 epochs, every triggered input passed).
- "paper": RAP eq. 4 on the probability drop with SGD, the published
  construction, kept so benchmarks can show the difference. On confident models
  it needs a ladder of stronger attempts; the one whose held-out threshold at the
  selection FRR is largest is kept. The report lists every attempt.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from calibrate.model import predict_probs, to_torch
from calibrate.progress import progress_bar
from calibrate.rap.options import MIN_CALIBRATION_ROWS, MIN_ROWS_BELOW_THRESHOLD, MIN_TRAIN_ROWS, Attempt, RapOptions
from guard.core import rap, thresholds
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger(__name__)


@dataclass
class AttemptReport:
    lower_bound_weight: float
    keep_norm: bool
    final_norm: float
    in_range_fraction: float  # training rows whose drop landed in the objective's band
    median_train_drop: float  # in the objective's units (probability or log-odds)
    thresholds: dict[int, float]  # protect label -> RAP score threshold at select_frr on the held-out rows
    chosen: bool = False

    @property
    def selection_threshold(self) -> float:
        """The largest (least separating) label's threshold at select_frr: the attempt with the smallest is kept."""
        return max(self.thresholds.values())


@dataclass
class LabelFit:
    label: int
    train_rows: int
    calibration_scores: np.ndarray  # RAP scores of the held-out rows predicted as the label
    texts: list[str] = field(default_factory=list)  # the held-out rows of calibration_scores, in order


@dataclass
class RapResult:
    token_id: int
    init_word: str
    init_norm: float
    final_norm: float
    fits: dict[int, LabelFit]
    attempts: list[AttemptReport] = field(default_factory=list)
    calibration_texts: list[Example] = field(default_factory=list)
    train_texts: list[str] = field(default_factory=list)  # the rows RAP trained on (never in a threshold)
    floors: dict[int, float] = field(default_factory=dict)  # protect label -> its floor (the floored statistic)


@dataclass(frozen=True)
class _Split:
    train: dict[int, list[str]]  # protect label -> clean texts of that label predicted as it
    calibration: dict[int, list[str]]  # protect label -> held-out texts predicted as it
    calibration_rows: list[Example]
    train_rows: list[str]  # every training-part text, any label (the feature detector fits on them)
    floors: dict[int, float]  # protect label -> its floor (guard.core.rap.floor) from its training rows


def learn_rap(model: PreTrainedModel, tokenizer: RapTokenizer, clean: list[Example], options: RapOptions) -> RapResult:
    """Append and train the RAP row in `model` (in place); fit thresholds on held-out rows."""
    _check_labels(model, clean, options.protect_labels)
    tokenizer.rap_position = options.rap_position
    split = _split(model, tokenizer, clean, options)
    init_word, init_id = options.init_word, tokenizer.word_id(options.init_word)
    if init_id is None:  # e.g. `rq` in a byte-level BPE or SentencePiece vocabulary
        init_word, init_id = tokenizer.rare_word()
        log.warning(
            "init word %r is not one token of this vocabulary; using %r, a rare one", options.init_word, init_word
        )
    token_id = _append_row(model, init_id)
    tokenizer.rap_token_id = token_id
    embeddings = model.get_input_embeddings().weight
    init_row = embeddings.data[token_id].clone()
    result = RapResult(token_id, init_word, float(init_row.norm()), 0.0, {})
    outcomes = []  # (fits, learned row) per attempt, so the best one needs no retraining
    for rung in options.ladder:
        embeddings.data[token_id] = init_row
        report, fits = _attempt(model, tokenizer, split, options, token_id, rung)
        result.attempts.append(report)
        outcomes.append((fits, embeddings.data[token_id].clone()))
    best = min(range(len(result.attempts)), key=lambda i: result.attempts[i].selection_threshold)
    result.attempts[best].chosen = True
    fits, embeddings.data[token_id] = outcomes[best]
    _refuse_unseparated(result.attempts[best], options)
    result.fits = fits
    result.final_norm = float(embeddings.data[token_id].norm())
    result.calibration_texts = split.calibration_rows
    result.train_texts = split.train_rows
    result.floors = split.floors if options.statistic in rap.FLOORED else {}
    return result


def _check_labels(model: PreTrainedModel, clean: list[Example], protect: tuple[int, ...]) -> None:
    n = model.config.num_labels
    bad = sorted({e.label for e in clean if e.label >= n})
    if bad:
        raise InputError(f"data has labels {bad} but the model has {n} labels (0..{n - 1})")
    for label in protect:
        if not 0 <= label < n:
            raise InputError(f"protect label {label} does not exist; the model has labels 0..{n - 1}")
    if not protect:
        raise InputError("no protect label given")


def split_rows(clean: list[Example], options: RapOptions) -> tuple[list[Example], list[Example]]:
    """The clean rows the RAP row trains on and the held-out rows its thresholds are fitted on (seeded)."""
    rows = list(clean)
    random.Random(options.seed).shuffle(rows)
    cut = int(round(len(rows) * (1.0 - options.calibration_fraction)))
    return rows[:cut], rows[cut:]


def _split(model: PreTrainedModel, tokenizer: RapTokenizer, clean: list[Example], options: RapOptions) -> _Split:
    train_rows, calib_rows = split_rows(clean, options)
    bar = "predict clean rows" if options.progress else None
    train_probs = predict_probs(model, tokenizer, [r.text for r in train_rows], progress=bar)
    train_pred = train_probs.argmax(axis=1)
    calib_pred = predict_probs(model, tokenizer, [r.text for r in calib_rows], progress=bar).argmax(axis=1)
    train, calibration, floors = {}, {}, {}
    for label in options.protect_labels:
        own = np.array([p == label == r.label for r, p in zip(train_rows, train_pred, strict=True)], dtype=bool)
        train[label] = [r.text for r, keep in zip(train_rows, own, strict=True) if keep]
        calibration[label] = [r.text for r, p in zip(calib_rows, calib_pred, strict=True) if p == label]
        _check_enough(label, len(train[label]), len(calibration[label]), train_pred, calib_pred)
        floors[label] = rap.floor(train_probs[own, label])
        warning = thin_threshold(label, len(calibration[label]), options.select_frr)
        if warning:
            log.warning(warning)
    return _Split(train, calibration, calib_rows, [r.text for r in train_rows], floors)


def _check_enough(label: int, n_train: int, n_calib: int, train_pred: np.ndarray, calib_pred: np.ndarray) -> None:
    if not (train_pred == label).any() and not (calib_pred == label).any():
        raise InputError(
            f"the model never predicts protect label {label} on the clean data; RAP has nothing to protect"
        )
    if n_train < MIN_TRAIN_ROWS or n_calib < MIN_CALIBRATION_ROWS:
        raise InputError(
            f"too little clean data for label {label}: {n_train} training rows (need {MIN_TRAIN_ROWS}) and "
            f"{n_calib} held-out rows predicted as it (need {MIN_CALIBRATION_ROWS}); pass a larger --clean file"
        )


def thin_threshold(label: int, rows: int, frr: float) -> str | None:
    """A warning when fewer than MIN_ROWS_BELOW_THRESHOLD held-out rows fall below the `frr` threshold."""
    below = rows * frr
    if below >= MIN_ROWS_BELOW_THRESHOLD:
        return None
    needed = math.ceil(MIN_ROWS_BELOW_THRESHOLD / frr)
    return (
        f"label {label}: its {frr:.1%} FRR threshold rests on {below:.1f} of {rows} held-out rows predicted as it; "
        f"about {needed} such rows put {MIN_ROWS_BELOW_THRESHOLD} below it (a larger --clean file, a larger "
        "--calibration-fraction or a higher --default-frr)"
    )


def _append_row(model: PreTrainedModel, init_id: int) -> int:
    token_id = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    weights = model.get_input_embeddings().weight
    weights.data[token_id] = weights.data[init_id].clone()
    return token_id


def _attempt(model, tokenizer, split: _Split, options: RapOptions, token_id: int, rung: Attempt):
    _train_row(model, tokenizer, split, options, token_id, rung)
    trained_as = "prob" if options.objective == "paper" else "logodds"  # the objective's own drop
    bar = "score RAP rows" if options.progress else None
    train_drops = -np.concatenate(
        [_scores(model, tokenizer, split.train[label], trained_as, bar) for label in options.protect_labels]
    )
    fits = {}
    for label in options.protect_labels:
        texts = split.calibration[label]
        fits[label] = LabelFit(
            label,
            len(split.train[label]),
            _scores(model, tokenizer, texts, options.statistic, bar, split.floors),
            texts,
        )
    low, up = options.band
    report = AttemptReport(
        lower_bound_weight=rung.lower_bound_weight,
        keep_norm=rung.keep_norm,
        final_norm=float(model.get_input_embeddings().weight.data[token_id].norm()),
        in_range_fraction=float(((train_drops >= low) & (train_drops <= up)).mean()),
        median_train_drop=float(np.median(train_drops)),
        thresholds={
            label: thresholds.threshold_at_frr(fit.calibration_scores, options.select_frr)
            for label, fit in fits.items()
        },
    )
    log.info(
        "RAP attempt lambda=%g keep_norm=%s: in-range %.2f, threshold at %.1f%% FRR %.4f",
        rung.lower_bound_weight,
        rung.keep_norm,
        report.in_range_fraction,
        options.select_frr * 100,
        report.selection_threshold,
    )
    return report, fits


def _refuse_unseparated(chosen: AttemptReport, options: RapOptions) -> None:
    """Under a drop statistic a clean row's score is minus its drop: a threshold >= 0 (no drop) flags (almost)
    nothing, refused. ("perturbed" is where the perturbed input lands, not a drop: any threshold is valid.)"""
    if options.statistic not in rap.DROP_STATISTICS:
        return
    for label, threshold in chosen.thresholds.items():
        if threshold >= 0:
            raise InputError(
                f"RAP could not separate clean inputs for label {label}: the {options.select_frr:.1%} FRR threshold "
                f"is {threshold:.4f} >= 0 (no drop) "
                f"even with lower-bound weight {options.ladder[-1].lower_bound_weight:g}; this model may not be "
                "RAP-calibratable (try more clean data or larger --c-low)"
            )


def _scores(model, tokenizer: RapTokenizer, texts: list[str], statistic: str, progress=None, floors=None):
    """The RAP score (guard.core.rap) of each text on its predicted label."""
    probs = predict_probs(model, tokenizer, texts, progress=progress)
    perturbed = predict_probs(model, tokenizer, texts, perturbed=True, progress=progress)
    return rap.scores(probs, perturbed, statistic, floors)


def _train_row(
    model, tokenizer: RapTokenizer, split: _Split, options: RapOptions, token_id: int, rung: Attempt
) -> None:
    rows = [(text, label) for label in options.protect_labels for text in split.train[label]]
    clean_p = {label: predict_probs(model, tokenizer, split.train[label])[:, label] for label in options.protect_labels}
    clean = np.concatenate([clean_p[label] for label in options.protect_labels])
    weights = model.get_input_embeddings().weight
    target_norm = float(weights.data[token_id].norm())
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in trainable:
        p.requires_grad_(False)
    row = torch.nn.Parameter(weights.data[token_id].clone())
    optimizer = _optimizer(options, row)
    model.eval()  # dropout off: the row must work at inference, where dropout is off
    rng = random.Random(options.seed)
    steps = options.epochs * ((len(rows) + options.batch_size - 1) // options.batch_size)
    desc = f"RAP {options.objective} lambda={rung.lower_bound_weight:g}"
    bar = progress_bar(total=steps, desc=desc, unit="step", disable=not options.progress)
    # The paper's objective can jump a confident model's drops from ~0 to ~1 (every clean input
    # flipped) within an epoch; keep the row whose batch had the most drops in range.
    best_in_range, best_row = -1.0, row.detach().clone()
    for _ in range(options.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            idx = order[start : start + options.batch_size]
            batch = [rows[i] for i in idx]
            loss, drop = _rap_loss(model, tokenizer, batch, row, torch.from_numpy(clean[idx]), rung, options)
            low, up = options.band
            in_range = float(((drop >= low) & (drop <= up)).double().mean())
            if options.objective == "paper" and in_range >= best_in_range:
                best_in_range, best_row = in_range, row.detach().clone()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rung.keep_norm:
                with torch.no_grad():
                    row *= target_norm / row.norm()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", in_range=f"{in_range:.2f}")
    bar.close()
    weights.data[token_id] = best_row if options.objective == "paper" else row.detach()
    for p, flag in trainable:
        p.requires_grad_(flag)


def _optimizer(options: RapOptions, row: torch.nn.Parameter) -> torch.optim.Optimizer:
    if options.optimizer == "adam":
        return torch.optim.Adam([row], lr=options.learning_rate)
    if options.optimizer == "sgd":
        return torch.optim.SGD([row], lr=options.learning_rate)
    raise InputError(f"unknown optimizer {options.optimizer!r}; choose adam or sgd")


def _rap_loss(
    model, tokenizer: RapTokenizer, rows, row: torch.Tensor, clean_p: torch.Tensor, rung: Attempt, options: RapOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """RAP eq. 4: lambda*[low - drop]+ + [drop - up]+, each row's drop on its protect label.

    Objective "logodds": the drop of the label's log-odds, log p - log(1 - p) =
    logit_y - logsumexp(other logits), from the logits, so its gradient does not vanish when
    p is ~0.999. Objective "paper": the probability drop.
    `row` is spliced in as the RAP token's embedding, so only it receives a gradient.
    Returns the loss and the (detached) drops of the batch."""
    texts = [t for t, _ in rows]
    labels = torch.tensor([label for _, label in rows])
    feeds = to_torch(tokenizer.encode_perturbed(texts))
    ids = feeds.pop("input_ids")
    embedded = model.get_input_embeddings()(ids).detach()
    embedded = torch.where((ids == tokenizer.rap_token_id)[:, :, None], row[None, None, :], embedded)
    logits = model(inputs_embeds=embedded, **feeds).logits.double()
    if options.objective == "logodds":
        label_logit = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        perturbed = label_logit - torch.logsumexp(others, dim=1)
        clean = torch.from_numpy(rap.log_odds(clean_p.numpy()))
    else:
        perturbed = torch.softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        clean = clean_p.double()
    drop = clean - perturbed
    low, up = options.band
    lower = torch.relu(low - drop)
    upper = torch.relu(drop - up)
    return (rung.lower_bound_weight * lower + upper).mean(), drop.detach()
