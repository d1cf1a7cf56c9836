"""`calibrate unlearn`: remove a found backdoor by fine-tuning it away (DBS Sec. 3.2, eq. 6).

DBS eq. 6 minimises L(f(x), y) - L(f(x ⊕ t̂), ŷ) over clean rows: keep clean rows
right and stop the inverted trigger t̂ from reaching its target ŷ. The second term
is unbounded below (it rewards pushing stamped rows ever further from ŷ), so, as
DBS appendix A does, it is realised as plain fine-tuning on clean rows of which a
share (20%) carry the inverted trigger and KEEP THEIR TRUE LABEL: the model
learns that the trigger means nothing.

Rows are split first: fine-tuning uses one part; clean accuracy (CACC) and the
trigger's ASR (non-target rows stamped with it, predicted as its target) are
measured before and after on the other.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.inversion import Subject, check_room, discrete_outcome, stamp
from calibrate.model import copy_tokenizer_files, flush_denormal, predict_probs
from calibrate.repair import write_record
from guard.core.errors import InputError
from guard.core.types import Example

MIN_EVAL_ROWS = 10


@dataclass(frozen=True)
class Trigger:
    """A trigger to unlearn: token ids (as stamped into rows) and the label it flips rows to."""

    token_ids: tuple[int, ...]
    target: int
    text: str = ""


@dataclass(frozen=True)
class UnlearnOptions:
    epochs: int = 2
    # MiniLM/SST-2 BadNet-RW, 698 rows, 2 epochs: 2e-5 left the trigger's ASR at 0.92; 1e-4 took it to 0.06
    learning_rate: float = 1e-4
    batch_size: int = 32
    stamp_fraction: float = 0.2  # share of the fine-tuning rows stamped with a trigger (DBS appendix A)
    position: str = "random"  # where triggers are stamped: the attack may have put them anywhere
    holdout_fraction: float = 0.2  # rows kept out of fine-tuning to measure CACC and ASR on
    progress: bool = True
    seed: int = 13


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
    options: UnlearnOptions = field(default_factory=UnlearnOptions)


def unlearn_model(
    subject: Subject, clean: list[Example], triggers: list[Trigger], options: UnlearnOptions = UnlearnOptions()
) -> UnlearnResult:
    """Fine-tune `subject.model` in place on clean rows, some stamped with a trigger and keeping their label."""
    started = time.perf_counter()
    _check(subject, clean, triggers)
    rows = list(clean)
    random.Random(options.seed).shuffle(rows)
    cut = int(round(len(rows) * options.holdout_fraction))
    evaluation, train = rows[:cut], rows[cut:]
    if len(evaluation) < MIN_EVAL_ROWS or not train:
        raise InputError(f"{len(rows)} clean rows are too few to fine-tune on and hold {MIN_EVAL_ROWS} out")
    cacc_before, asr_before = _measure(subject, evaluation, triggers, options)
    ids, labels, stamped = _training_rows(subject, train, triggers, options)
    with flush_denormal():
        fine_tune(subject, ids, labels, options)
    cacc_after, asr_after = _measure(subject, evaluation, triggers, options)
    return UnlearnResult(
        triggers=triggers,
        cacc_before=cacc_before,
        cacc_after=cacc_after,
        asr_before=asr_before,
        asr_after=asr_after,
        train_rows=len(train),
        stamped_rows=stamped,
        eval_rows=len(evaluation),
        seconds=time.perf_counter() - started,
        options=options,
    )


def train_batch(subject: Subject, optimizer: torch.optim.Optimizer, rows: list[list[int]], labels: list[int]) -> float:
    """One optimiser step on token-id rows (dropout on, as in fine-tuning); returns the loss."""
    model = subject.model
    model.train()
    batch = subject.tokenizer.pad(rows)
    loss = model(
        input_ids=torch.from_numpy(batch.input_ids),
        attention_mask=torch.from_numpy(batch.attention_mask),
        labels=torch.tensor(labels),
    ).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return loss.item()


def fine_tune(subject: Subject, rows: list[list[int]], labels: list[int], options: UnlearnOptions) -> None:
    optimizer = torch.optim.AdamW(subject.model.parameters(), lr=options.learning_rate, weight_decay=0.01)
    rng = random.Random(options.seed)
    steps = options.epochs * ((len(rows) + options.batch_size - 1) // options.batch_size)
    bar = tqdm(total=steps, desc="unlearning", unit="step", disable=not options.progress)
    for _ in range(options.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            chosen = order[start : start + options.batch_size]
            loss = train_batch(subject, optimizer, [rows[i] for i in chosen], [labels[i] for i in chosen])
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
) -> tuple[list[list[int]], list[int], int]:
    """Token ids of the fine-tuning rows, `stamp_fraction` of them carrying a trigger, and their TRUE labels."""
    rng = random.Random(options.seed)
    ids = subject.tokenizer.ids([r.text for r in train])
    chosen = rng.sample(range(len(ids)), int(round(len(ids) * options.stamp_fraction)))
    pad = subject.tokenizer.pad_id
    for i in chosen:
        trigger = rng.choice(triggers)
        batch = stamp([ids[i]], trigger.token_ids, options.position, pad, rng)
        ids[i] = batch.input_ids[0].tolist()
    return ids, [r.label for r in train], len(chosen)


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


def triggers_from_scan(report_path: Path) -> list[Trigger]:
    """The triggers of the pairs a `calibrate scan --out` report judged backdoored."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
        flagged = [p for p in report["pairs"] if p["flagged"]]
        triggers = [Trigger(tuple(p["token_ids"]), int(p["target"]), p["text"]) for p in flagged]
    except FileNotFoundError:
        raise InputError(f"{report_path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{report_path} is not a `calibrate scan` report: {exc}") from exc
    if not triggers:
        raise InputError(
            f"the scan in {report_path} found no backdoor; pass --trigger TEXT --target LABEL to unlearn one anyway"
        )
    return triggers


def save_model(subject: Subject, out_dir: Path, method: str, details: dict) -> None:
    """Write the repaired model as a HF directory (weights, tokenizer) with its `repair.json` record.

    Call `calibrate.repair.prepare_out_dir` first, before the work: it refuses the input
    folder and a non-empty one without --force.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subject.model.save_pretrained(str(out_dir))
    copy_tokenizer_files(subject.source, out_dir)
    write_record(out_dir, method, subject.source, details)
