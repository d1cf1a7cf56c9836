"""`calibrate harden`: iterative augmentation with synthetic triggers (Shen et al., "Hardening
Modern Pre-trained NLP Models Against Backdoors", Sec. 4, Algorithms 1-2, appendix D).

Every round, for every pair of labels (y_i, y_j) and a batch of clean rows of each:

1. per direction, find the SHORTEST inverted trigger whose ASR on the batch reaches
   phi (0.8): a binary length search (BLS, Algorithm 2) over [lambda, epsilon], where
   lambda is the direction's running-average lower bound -- or, with probability p
   and lambda > 1, an exhaustive try of every length below lambda, keeping the
   trigger with the highest ASR (the randomised fallback of Sec. 4.2 / appendix D);
2. synchronise the two directions (Algorithm 1 lines 5-13): if one needs a trigger
   at least delta tokens longer (more progress), re-invert it at the other's length
   and update only the lagging direction's lower bound; otherwise update both;
3. one training step on the clean rows plus both batches stamped with their
   triggers and KEEPING their true labels (line 14).

The inversion engine is the scan's (`calibrate.inversion.dbs`, DBS). The model's
robustness is the epsilon-mean average ASR (Definition I, eq. 3): the ASR of
inverted triggers averaged over every ordered label pair and every length 1..epsilon,
measured on held-out rows before and after hardening.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from calibrate.data import load_examples
from calibrate.inversion.dbs import Inversion, invert_trigger
from calibrate.inversion.options import HardenJob, HardenOptions, ScanOptions
from calibrate.inversion.scan import scan_pair
from calibrate.inversion.schedule import (
    LengthSearch,
    RunningMean,
    binary_length_search,
    eps_mean_average_asr,
    exhaustive_search,
    synchronise,
)
from calibrate.inversion.subject import LabelRows, Subject, check_room, correct_rows, load_subject, save_model, stamp
from calibrate.inversion.unlearn import accuracy, train_batch
from calibrate.model import flush_denormal
from calibrate.progress import progress_bar
from calibrate.record import prepare_out_dir
from guard.core.errors import InputError
from guard.core.types import Example

MIN_ROWS_PER_LABEL = 4


# ------------------------------------------------------------------ hardening a model


@dataclass(frozen=True)
class RoundLog:
    """One pair's round: lengths and ASRs used for training, what the scheduler did."""

    epoch: int
    labels: tuple[int, int]
    forward_length: int
    backward_length: int
    forward_asr: float
    backward_asr: float
    regenerated: str | None
    exhaustive: tuple[bool, bool]
    inversions: int
    loss: float


@dataclass(frozen=True)
class HardenResult:
    eps_ma2_before: float | None
    eps_ma2_after: float | None
    asr_before: list | None  # ASR[i][j][m-1] on held-out rows
    asr_after: list | None
    cacc_before: float
    cacc_after: float
    rounds: list[RoundLog]
    lower_bounds: dict[str, float]  # "i->j" -> final running-average lower bound
    seconds: float
    measure_seconds: float
    options: HardenOptions

    def to_json(self) -> dict:
        return asdict(self)


def harden_model(subject: Subject, clean: list[Example], options: HardenOptions = HardenOptions()) -> HardenResult:
    """Harden `subject.model` in place (Algorithm 1, `epochs` passes over the training rows)."""
    started = time.perf_counter()
    check_room(subject, options.max_trigger_length)
    held_out, train_rows = _holdout(clean, options)
    train, evaluation = _correct_train_rows(subject, train_rows, options), correct_rows(subject, held_out, options.seed)
    before, before_seconds = _measured(subject, evaluation, options)
    cacc_before = accuracy(subject, held_out)
    hardening = _Hardening(subject, options)
    with flush_denormal():
        rounds = hardening.run(train)
    after, after_seconds = _measured(subject, evaluation, options)
    return HardenResult(
        eps_ma2_before=None if before is None else eps_mean_average_asr(before),
        eps_ma2_after=None if after is None else eps_mean_average_asr(after),
        asr_before=None if before is None else before.tolist(),
        asr_after=None if after is None else after.tolist(),
        cacc_before=cacc_before,
        cacc_after=accuracy(subject, held_out),
        rounds=rounds,
        lower_bounds={f"{i}->{j}": mean.value for (i, j), mean in hardening.bounds.items()},
        seconds=time.perf_counter() - started,
        measure_seconds=before_seconds + after_seconds,
        options=options,
    )


def measure_asr(subject: Subject, rows: LabelRows, options: HardenOptions) -> np.ndarray:
    """ASR[i, j, m-1] of a DBS trigger of length m inverted i -> j, on held-out rows of label i.

    Up to `measure_rows_per_label` rows of each label, never more than half, invert the
    triggers; the rest score them. NaN where a label has too few rows for both.
    """
    n, epsilon = subject.num_labels, options.max_trigger_length
    inversion_rows, heldout = _halves(rows, options.measure_rows_per_label)
    asr = np.full((n, n, epsilon), np.nan)
    victims = [i for i in heldout.labels() if inversion_rows.texts[i]]
    cells = [(i, j, m) for i in victims for j in range(n) if j != i for m in range(1, epsilon + 1)]
    for i, j, m in progress_bar(cells, desc="eps-mA^2", unit="inversion", disable=not options.progress):
        scan = ScanOptions(trigger_length=m, inversion=options.inversion, progress=False)
        asr[i, j, m - 1] = scan_pair(subject, inversion_rows, heldout, i, j, scan).asr
    return asr


def _measured(subject: Subject, rows: LabelRows, options: HardenOptions) -> tuple[np.ndarray | None, float]:
    """The ASR matrix (None when not measuring) and the seconds it took; refuses an empty one at once."""
    if not options.measure:
        return None, 0.0
    started = time.perf_counter()
    asr = measure_asr(subject, rows, options)
    eps_mean_average_asr(asr)  # no measurable pair: say so now, not after the hardening
    return asr, time.perf_counter() - started


def _halves(rows: LabelRows, first: int) -> tuple[LabelRows, LabelRows]:
    head, tail = {}, {}
    for label, texts in rows.texts.items():
        cut = min(first, len(texts) // 2)
        head[label], tail[label] = texts[:cut], texts[cut:]
    return LabelRows(head), LabelRows(tail)


class _Hardening:
    """Algorithm 1 over the training rows: running-average bounds per direction, one optimiser."""

    def __init__(self, subject: Subject, options: HardenOptions) -> None:
        self.subject, self.options = subject, options
        self.rng = random.Random(options.seed)
        labels = range(subject.num_labels)
        self.bounds = {(i, j): RunningMean() for i in labels for j in labels if i != j}
        self.optimizer = torch.optim.AdamW(subject.model.parameters(), lr=options.learning_rate, weight_decay=0.01)
        self.inversions = 0

    def run(self, train: LabelRows) -> list[RoundLog]:
        labels = train.labels()
        pairs = [(i, j) for i in labels for j in labels if i < j]
        rounds = []
        for epoch in range(self.options.epochs):
            batches = _batches(train, self.options.batch_size, self.rng)
            desc = f"hardening epoch {epoch + 1}"
            steps = progress_bar(batches, desc=desc, unit="round", disable=not self.options.progress)
            for texts in steps:
                batch = {label: self.subject.tokenizer.ids(rows) for label, rows in texts.items()}
                for i, j in pairs:
                    rounds.append(self.harden_pair(epoch, batch, i, j))
                    steps.set_postfix(lengths=f"{rounds[-1].forward_length}/{rounds[-1].backward_length}")
        return rounds

    def harden_pair(self, epoch: int, batch: dict[int, list[list[int]]], i: int, j: int) -> RoundLog:
        """Algorithm 1 lines 3-14 for labels i and j."""
        self.inversions = 0
        forward = self.search(batch[i], i, j)
        backward = self.search(batch[j], j, i)
        sync = synchronise(forward.length, backward.length, self.options.sync_gap)
        if sync.regenerate == "forward":
            forward = self.fixed_length(batch[i], j, backward.length)
        elif sync.regenerate == "backward":
            backward = self.fixed_length(batch[j], i, forward.length)
        if sync.update_forward:
            self.bounds[(i, j)].add(forward.length)
        if sync.update_backward:
            self.bounds[(j, i)].add(backward.length)
        loss = self.train_step(batch[i], batch[j], i, j, forward, backward)
        return RoundLog(
            epoch=epoch,
            labels=(i, j),
            forward_length=forward.length,
            backward_length=backward.length,
            forward_asr=forward.trigger.asr,
            backward_asr=backward.trigger.asr,
            regenerated=sync.regenerate,
            exhaustive=(forward.exhaustive, backward.exhaustive),
            inversions=self.inversions,
            loss=loss,
        )

    def search(self, rows: list[list[int]], victim: int, target: int) -> LengthSearch:
        """BLS over [lambda, epsilon], or with probability p every length below lambda."""
        options = self.options
        lower = self.bounds[(victim, target)].bound(options.max_trigger_length)
        invert = self.inverter(rows, target)
        if lower > 1 and self.rng.random() < options.exhaustive_probability:
            return exhaustive_search(invert, lower, options.asr_bound)
        return binary_length_search(invert, lower, options.max_trigger_length, options.asr_bound)

    def fixed_length(self, rows: list[list[int]], target: int, length: int) -> LengthSearch:
        trigger = self.inverter(rows, target)(length)
        return LengthSearch(length, trigger, trigger.asr >= self.options.asr_bound, (length,))

    def inverter(self, rows: list[list[int]], target: int) -> Callable[[int], Inversion]:
        def invert(length: int) -> Inversion:
            self.inversions += 1
            return invert_trigger(self.subject, rows, target, length, self.options.inversion)

        return invert

    def train_step(self, rows_i, rows_j, i: int, j: int, forward: LengthSearch, backward: LengthSearch) -> float:
        """Line 14: (X_i ⊕ T_ij, y_i) ∪ (X_j ⊕ T_ji, y_j), plus the clean rows themselves."""
        pad, position = self.subject.tokenizer.pad_id, self.options.inversion.position
        stamped_i = _stamped(rows_i, forward.trigger.token_ids, position, pad, self.rng)
        stamped_j = _stamped(rows_j, backward.trigger.token_ids, position, pad, self.rng)
        rows = [*rows_i, *rows_j, *stamped_i, *stamped_j]
        labels = [i] * len(rows_i) + [j] * len(rows_j) + [i] * len(stamped_i) + [j] * len(stamped_j)
        return train_batch(self.subject, self.optimizer, rows, labels)


def _stamped(rows: list[list[int]], trigger, position: str, pad: int, rng: random.Random) -> list[list[int]]:
    batch = stamp(rows, trigger, position, pad, rng)
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]


def _holdout(clean: list[Example], options: HardenOptions) -> tuple[list[Example], list[Example]]:
    """`holdout_fraction` of the rows to measure on (CACC on all of them, eps-mA^2 on the correct ones)."""
    rows = list(clean)
    random.Random(options.seed).shuffle(rows)
    cut = int(round(len(rows) * options.holdout_fraction))
    return rows[:cut], rows[cut:]


def _correct_train_rows(subject: Subject, rows: list[Example], options: HardenOptions) -> LabelRows:
    """Training rows the model classifies correctly (eq. 1: X_yi = {x | f(x) = y_i}), for labels with enough."""
    by_label = correct_rows(subject, rows, options.seed).texts
    short = {label: len(t) for label, t in by_label.items() if len(t) < MIN_ROWS_PER_LABEL}
    if len(by_label) - len(short) < 2:
        raise InputError(
            f"too little clean data to harden: correctly classified training rows per label {short} "
            f"(need {MIN_ROWS_PER_LABEL} for at least two labels)"
        )
    return LabelRows({label: t for label, t in by_label.items() if label not in short})


def _batches(rows: LabelRows, batch_size: int, rng: random.Random) -> list[dict[int, list[str]]]:
    """Rounds of one epoch: a batch of every label per round; shorter labels cycle."""
    shuffled = {label: rng.sample(texts, len(texts)) for label, texts in rows.texts.items()}
    rounds = max((len(t) + batch_size - 1) // batch_size for t in shuffled.values())
    out = []
    for r in range(rounds):
        out.append({label: _cycle(texts, r * batch_size, batch_size) for label, texts in shuffled.items()})
    return out


def _cycle(items: list, start: int, count: int) -> list:
    return [items[(start + k) % len(items)] for k in range(count)] if len(items) >= count else list(items)


# ------------------------------------------------------------------ `calibrate harden`


def run_harden(job: HardenJob, say: Callable[[str], None] = print) -> HardenResult:
    """`calibrate harden`: harden a copy of the model, save it with its record, print the summary."""
    prepare_out_dir(job.model, job.out, job.force)
    clean = load_examples(job.clean)
    subject = load_subject(job.model, job.max_length)
    result = harden_model(subject, clean, job.options)
    save_model(subject, job.out, "harden", result.to_json())
    if result.eps_ma2_before is not None:
        epsilon = job.options.max_trigger_length
        say(f"eps-mA^2 (epsilon {epsilon}): {result.eps_ma2_before:.4f} -> {result.eps_ma2_after:.4f}")
    say(f"clean accuracy {result.cacc_before:.4f} -> {result.cacc_after:.4f}; {len(result.rounds)} rounds")
    say(f"saved {job.out} in {result.seconds:.0f} s (record: {Path(job.out) / 'repair.json'})")
    return result
