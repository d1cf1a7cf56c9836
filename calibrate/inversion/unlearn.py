"""`calibrate unlearn`: remove a found backdoor by fine-tuning it away (DBS Sec. 3.2, eq. 6).

DBS eq. 6 minimises L(f(x), y) - L(f(x ⊕ t̂), ŷ) over clean rows: keep clean rows
right and stop the inverted trigger t̂ from reaching its target ŷ. The second term
is unbounded below (it rewards pushing stamped rows ever further from ŷ), so, as
DBS appendix A does, it is realised as plain fine-tuning on clean rows of which a
share (20%) carry the inverted trigger and KEEP THEIR TRUE LABEL: the model
learns that the trigger means nothing.

With `teacher_weight` w > 0 the target of every row, stamped or not, is
(1 - w) * one-hot(true label) + w * (the suspect model's own softmax on the row
WITHOUT the trigger), computed once before fine-tuning. The teacher term anchors
the model where it was on clean inputs, so a few hundred rows do not drag clean
accuracy down, while the stamped rows still learn that the trigger changes nothing.

Embedding poisoning (EP) plants a backdoor in one input-embedding row, with a norm
far outside the vocabulary's (MiniLM/SST-2: 6.2 and 7.1, against at most 1.7 for
every other token). Fine-tuning at a normal rate cannot move that row: unlearning
`tq` that way left its ASR at 100%. So, by default (`reset_embeddings` "outliers"),
a trigger token whose embedding norm is over OUTLIER_FACTOR times the vocabulary's
99.9th percentile first gets the mean embedding. Not every trigger token: a BadNet
word has an ordinary norm, and resetting it would leave nothing for the stamped
rows to teach, so the model's learned response to the trigger, which the planted
words share, would survive (measured: BadNet-RW ASR 16% without the reset, 71%
with it). "all" and "none" force either choice. When the reset alone takes every
trigger's held-out ASR to `reset_enough` or below, there is no fine-tuning at all.

Rows are split first: fine-tuning uses one part; clean accuracy (CACC) and the
trigger's ASR (non-target rows stamped with it, predicted as its target) are
measured before and after on the other.

A scan finds one trigger per label pair, but an attacker may plant several (BadNet
with three rare words): unlearning one only partly removes the others. With
`rescans` > 0 (`unlearn_rescanning`), the repaired model is scanned again; while
that scan flags triggers not unlearned yet, all triggers found so far are
unlearned again, from the suspect's original weights.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibrate.data import load_examples
from calibrate.inversion.dbs import discrete_outcome
from calibrate.inversion.options import (
    RESET_MODES,
    ScanOptions,
    UnlearnJob,
    UnlearnOptions,
)
from calibrate.inversion.scan import ScanResult, scan_model, scan_options_from_report, triggers_from_scan
from calibrate.inversion.subject import Subject, Trigger, check_room, load_subject, save_model, stamp
from calibrate.model import flush_denormal, predict_probs
from calibrate.progress import progress_bar
from calibrate.record import prepare_out_dir
from guard.core.errors import InputError
from guard.core.types import Example

MIN_EVAL_ROWS = 10
OUTLIER_FACTOR = 2.0  # an embedding norm over this x the vocabulary's 99.9th percentile is a planted row


@dataclass(frozen=True)
class UnlearnResult:
    triggers: list[Trigger]
    cacc_before: float
    cacc_after: float
    asr_before: list[float]  # per trigger, on the held-out non-target rows
    asr_after: list[float]
    train_rows: int
    stamped_rows: int
    eval_rows: int
    seconds: float
    reset_tokens: list[int] = field(default_factory=list)  # given the mean embedding before fine-tuning
    fine_tuned: bool = True  # False: the reset alone took every trigger's ASR to `reset_enough` or below
    options: UnlearnOptions = field(default_factory=UnlearnOptions)


def unlearn_model(
    subject: Subject, clean: list[Example], triggers: list[Trigger], options: UnlearnOptions = UnlearnOptions()
) -> UnlearnResult:
    """Unlearn triggers from `subject.model` in place: reset outlier trigger embeddings, then, unless that
    sufficed, fine-tune on clean rows of which some are stamped with a trigger and keep their label."""
    started = time.perf_counter()
    _check(subject, clean, triggers)
    if options.reset_embeddings not in RESET_MODES:
        raise InputError(f"reset_embeddings {options.reset_embeddings!r}: choose one of {', '.join(RESET_MODES)}")
    evaluation, train = split_rows(clean, options)
    cacc_before, asr_before = _measure(subject, evaluation, triggers, options)
    ids, stamped = _training_rows(subject, train, triggers, options)
    targets = soft_targets(subject, train, options.teacher_weight)
    reset = reset_embeddings(subject, _tokens_to_reset(subject, triggers, options.reset_embeddings))
    fine_tuned = not reset or max(_measure(subject, evaluation, triggers, options)[1]) > options.reset_enough
    if fine_tuned:
        with flush_denormal():
            fine_tune(subject, ids, targets, options)
    cacc_after, asr_after = _measure(subject, evaluation, triggers, options)
    return UnlearnResult(
        triggers=triggers,
        cacc_before=cacc_before,
        cacc_after=cacc_after,
        asr_before=asr_before,
        asr_after=asr_after,
        train_rows=len(train),
        stamped_rows=stamped,
        reset_tokens=reset,
        fine_tuned=fine_tuned,
        eval_rows=len(evaluation),
        seconds=time.perf_counter() - started,
        options=options,
    )


def split_rows(clean: list[Example], options: UnlearnOptions) -> tuple[list[Example], list[Example]]:
    """(held-out rows to measure on, rows to fine-tune on): a seeded shuffle, `holdout_fraction` held out."""
    rows = list(clean)
    random.Random(options.seed).shuffle(rows)
    cut = int(round(len(rows) * options.holdout_fraction))
    if cut < MIN_EVAL_ROWS or cut == len(rows):
        raise InputError(f"{len(rows)} clean rows are too few to fine-tune on and hold {MIN_EVAL_ROWS} out")
    return rows[:cut], rows[cut:]


@dataclass(frozen=True)
class Rescan:
    """One scan of the repaired model: what it flagged, and which of those were new."""

    unlearned: list[str]  # the triggers the model had been unlearned on
    flagged: list[str]
    new: list[str]
    suspect: str  # the scan's most suspicious pair and trigger, with its loss
    seconds: float
    skipped_victims: dict[int, str] = field(default_factory=dict)  # labels the rescan could not invert from


def unlearn_rescanning(
    subject: Subject,
    clean: list[Example],
    triggers: list[Trigger],
    options: UnlearnOptions = UnlearnOptions(),
    scan: ScanOptions | None = None,
    rescans: int = 2,
    scan_rows: list[Example] | None = None,
) -> tuple[UnlearnResult, list[Rescan]]:
    """Unlearn, scan the result, and repeat with every trigger found so far until none is new.

    The rescans run with `scan` (default: ScanOptions()) on `scan_rows`, by default on
    the rows the unlearning holds out.
    """
    scan = scan or ScanOptions()
    scan_rows = split_rows(clean, options)[0] if scan_rows is None else scan_rows
    original = copy.deepcopy(subject.model.state_dict())

    def unlearn(found: list[Trigger]) -> UnlearnResult:
        subject.model.load_state_dict(original)
        return unlearn_model(subject, clean, found, options)

    def rescan(found: list[Trigger]) -> tuple[list[Trigger], Rescan]:
        report = scan_model(subject, scan_rows, scan)
        flagged = scan_triggers(report)
        new = [t for t in flagged if t not in found]
        names = [t.text for t in found], [t.text for t in flagged], [t.text for t in new]
        return new, Rescan(*names, _suspect(report), report.seconds, report.skipped_victims)

    return rescan_loop(unlearn, rescan, triggers, rescans)


def rescan_loop(
    unlearn: Callable[[list[Trigger]], UnlearnResult],
    rescan: Callable[[list[Trigger]], tuple[list[Trigger], Rescan]],
    triggers: list[Trigger],
    rescans: int,
) -> tuple[UnlearnResult, list[Rescan]]:
    """Unlearn `triggers`; then, at most `rescans` times, rescan and unlearn again with what was new."""
    found = list(triggers)
    result = unlearn(found)
    history: list[Rescan] = []
    while len(history) < rescans:
        new, record = rescan(found)
        history.append(record)
        if not new:
            break
        found += new
        result = unlearn(found)
    return result, history


def unlearn_record(result: UnlearnResult, rescans: list[Rescan]) -> dict:
    """What repair.json keeps of an unlearning: the result and every rescan."""
    return {**asdict(result), "rescans": [asdict(r) for r in rescans]}


def scan_triggers(report: ScanResult) -> list[Trigger]:
    """The triggers of the pairs a scan flagged."""
    return [Trigger(tuple(p.token_ids), p.target, p.text) for p in report.flagged]


def _suspect(report: ScanResult) -> str:
    s = report.suspect
    return f"{s.victim}->{s.target} {s.text!r} loss {s.loss:.4f}" if s else ""


def train_batch(
    subject: Subject, optimizer: torch.optim.Optimizer, rows: list[list[int]], targets: list[int] | torch.Tensor
) -> float:
    """One optimiser step on token-id rows (dropout on, as in fine-tuning); returns the loss.

    `targets`: a label per row, or a (rows, labels) tensor of target distributions.
    """
    model = subject.model
    model.train()
    batch = subject.tokenizer.pad(rows)
    logits = model(
        input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask)
    ).logits
    if isinstance(targets, torch.Tensor):
        loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    else:
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return loss.item()


def reset_embeddings(subject: Subject, token_ids: set[int]) -> list[int]:
    """Give tokens the mean input embedding (what an EP trigger carried is gone); returns them, sorted."""
    weight = subject.model.get_input_embeddings().weight
    with torch.no_grad():
        mean = weight.mean(dim=0)
        for token_id in sorted(token_ids):
            weight[token_id] = mean
    return sorted(token_ids)


def embedding_outliers(subject: Subject, token_ids: set[int], factor: float = OUTLIER_FACTOR) -> set[int]:
    """The tokens whose input-embedding norm is over `factor` x the vocabulary's 99.9th percentile."""
    norms = subject.model.get_input_embeddings().weight.detach().norm(dim=1)
    limit = factor * float(torch.quantile(norms, 0.999))
    return {i for i in token_ids if float(norms[i]) > limit}


def _tokens_to_reset(subject: Subject, triggers: list[Trigger], mode: str) -> set[int]:
    tokens = {i for t in triggers for i in t.token_ids}
    if mode == "outliers":
        return embedding_outliers(subject, tokens)
    return tokens if mode == "all" else set()


def soft_targets(subject: Subject, rows: list[Example], teacher_weight: float) -> torch.Tensor:
    """Per row, (1 - w) * one-hot(label) + w * the model's current softmax on the row's text."""
    labels = torch.tensor([r.label for r in rows])
    targets = torch.nn.functional.one_hot(labels, subject.num_labels).float()
    if teacher_weight > 0:
        with torch.no_grad():
            teacher = torch.from_numpy(predict_probs(subject.model, subject.tokenizer, [r.text for r in rows]))
        targets = (1 - teacher_weight) * targets + teacher_weight * teacher.float()
    return targets


def fine_tune(subject: Subject, rows: list[list[int]], targets: torch.Tensor, options: UnlearnOptions) -> None:
    optimizer = torch.optim.AdamW(subject.model.parameters(), lr=options.learning_rate, weight_decay=0.01)
    rng = random.Random(options.seed)
    steps = options.epochs * ((len(rows) + options.batch_size - 1) // options.batch_size)
    bar = progress_bar(total=steps, desc="unlearning", unit="step", disable=not options.progress)
    for _ in range(options.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            chosen = order[start : start + options.batch_size]
            loss = train_batch(subject, optimizer, [rows[i] for i in chosen], targets[chosen])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()


def accuracy(subject: Subject, rows: list[Example]) -> float:
    if not rows:
        return float("nan")
    predicted = predict_probs(subject.model, subject.tokenizer, [r.text for r in rows]).argmax(axis=1)
    return float(np.mean(predicted == np.array([r.label for r in rows])))


def trigger_asr(subject: Subject, rows: list[Example], trigger: Trigger, position: str, seed: int) -> float:
    """Share of the non-target rows that the model sends to the target once the trigger is stamped in."""
    victims = [r.text for r in rows if r.label != trigger.target]
    ids = subject.tokenizer.ids(victims)
    pad = subject.tokenizer.pad_id
    return discrete_outcome(subject.model, ids, trigger.token_ids, trigger.target, position, pad, seed).asr


def _measure(
    subject: Subject, rows: list[Example], triggers: list[Trigger], options: UnlearnOptions
) -> tuple[float, list[float]]:
    asr = [trigger_asr(subject, rows, t, options.position, options.seed) for t in triggers]
    return accuracy(subject, rows), asr


def _training_rows(
    subject: Subject, train: list[Example], triggers: list[Trigger], options: UnlearnOptions
) -> tuple[list[list[int]], int]:
    """Token ids of the fine-tuning rows, `stamp_fraction` of them carrying a trigger (their labels stay)."""
    rng = random.Random(options.seed)
    ids = subject.tokenizer.ids([r.text for r in train])
    chosen = rng.sample(range(len(ids)), int(round(len(ids) * options.stamp_fraction)))
    pad = subject.tokenizer.pad_id
    for i in chosen:
        trigger = rng.choice(triggers)
        batch = stamp([ids[i]], trigger.token_ids, options.position, pad, rng)
        ids[i] = batch.input_ids[0].tolist()
    return ids, len(chosen)


def _check(subject: Subject, clean: list[Example], triggers: list[Trigger]) -> None:
    if not triggers:
        raise InputError("no trigger to unlearn")
    n = subject.num_labels
    for t in triggers:
        if not 0 <= t.target < n:
            raise InputError(f"trigger {t.text or t.token_ids!r} targets label {t.target}; the model has 0..{n - 1}")
        if not t.token_ids:
            raise InputError("a trigger to unlearn has no tokens")
        check_room(subject, len(t.token_ids))
    bad = sorted({e.label for e in clean if e.label >= n})
    if bad:
        raise InputError(f"data has labels {bad} but the model has {n} labels (0..{n - 1})")


# ------------------------------------------------------------------ `calibrate unlearn`


def run_unlearn(job: UnlearnJob, say: Callable[[str], None] = print) -> UnlearnResult:
    """`calibrate unlearn`: unlearn the scan's (or the given) triggers with rescans; save the model."""
    if job.triggers and job.target is None:
        raise InputError("--trigger needs --target LABEL (the label the trigger flips rows to)")
    triggers = triggers_from_scan(job.scan) if job.scan else None
    scan = scan_options_from_report(job.scan) if job.scan else ScanOptions()
    prepare_out_dir(job.model, job.out, job.force)
    clean = load_examples(job.clean)
    subject = load_subject(job.model, job.max_length)
    if triggers is None:
        triggers = [Trigger(tuple(subject.vocabulary.word_ids(t)), job.target, t) for t in job.triggers]
    started = time.perf_counter()
    result, rescans = unlearn_rescanning(subject, clean, triggers, job.options, scan, job.rescans)
    seconds = time.perf_counter() - started
    save_model(subject, job.out, "unlearn", unlearn_record(result, rescans))
    for line in _summary(subject, result, rescans):
        say(line)
    say(f"saved {job.out} in {seconds:.0f} s, rescans included (record: {Path(job.out) / 'repair.json'})")
    return result


def _summary(subject: Subject, result: UnlearnResult, rescans: list[Rescan]) -> list[str]:
    lines = [
        f"trigger {trigger.text!r} -> label {trigger.target}: ASR {before:.4f} -> {after:.4f}"
        for trigger, before, after in zip(result.triggers, result.asr_before, result.asr_after, strict=True)
    ]
    if result.reset_tokens:
        tokens = [subject.vocabulary.token(i) for i in result.reset_tokens]
        tuned = "then fine-tuned" if result.fine_tuned else "which alone removed the triggers: no fine-tuning"
        lines.append(f"reset to the mean embedding: {', '.join(tokens)} ({tuned})")
    cacc = f"{result.cacc_before:.4f} -> {result.cacc_after:.4f}"
    lines.append(f"clean accuracy {cacc} ({result.eval_rows} held-out rows)")
    lines += [f"rescan {number}: {rescan_summary(rescan)}" for number, rescan in enumerate(rescans, 1)]
    return lines


def rescan_summary(rescan: Rescan) -> str:
    skipped = "".join(f"; label {k} not scanned as victim ({why})" for k, why in rescan.skipped_victims.items())
    if rescan.new:
        return f"new triggers {', '.join(map(repr, rescan.new))}: unlearning all found so far again{skipped}"
    flagged = f"still flagged: {', '.join(map(repr, rescan.flagged))}" if rescan.flagged else "nothing flagged"
    return f"{flagged} (most suspicious: {rescan.suspect}){skipped}"
