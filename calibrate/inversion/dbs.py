"""Trigger inversion shared by `calibrate scan`, `unlearn` and `harden`, and the token
ranking that gives `calibrate rap`'s flip scan its candidates (`ranked_tokens`).

DBS (Shen et al. 2022, "Constrained optimization with dynamic bound-scaling"):
each of the m trigger tokens is a point of the convex hull of ALL token
embeddings (Proposition I), t_q = sum_k alpha_qk e(c_k), with alpha_q a softmax
of free weights w_q at temperature lambda (eq. 10). The weights are optimised to
flip clean rows of a victim label to a target label (eq. 9; by exponentiated
gradient steps, not the paper's Adam: see `_Search.step`); every `check_every`
steps the temperature is lowered when the inversion loss is under the bound
beta' and raised, with a random offset to the weights, when it is not
(Algorithm 1). Only the DISCRETE trigger counts: at every check the argmax tokens
and a few near-ties are stamped into the rows as real ids and scored, and the one
with the lowest loss is kept (Algorithm 1 lines 11-13 keep one-hot results with a
small loss; scoring the tokens themselves measures that directly).

The trigger reaches the model through `get_input_embeddings()` and
`inputs_embeds`, so any BERT-family classifier works. The search space is the
tokenizer's vocabulary minus special and `[unused*]` tokens and, unless asked,
minus `##` continuation pieces (they cannot start a word of typed text, so a
trigger made of them could never be written as a probe or reach the model).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from calibrate.inversion.options import InversionOptions, TemperatureOptions
from calibrate.inversion.subject import StampedBatch, Subject, stamp
from calibrate.progress import progress_bar
from guard.core.errors import InputError

EVAL_BATCH = 64


def relaxed_logits(model: PreTrainedModel, batch: StampedBatch, trigger_vectors: torch.Tensor) -> torch.Tensor:
    """Logits with the trigger slots holding `trigger_vectors` (m x hidden) instead of token embeddings."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    rows = torch.arange(len(batch.input_ids))[:, None].expand_as(batch.slots)
    values = trigger_vectors.unsqueeze(0).expand(len(batch.input_ids), -1, -1)
    embeds = embeds.index_put((rows, batch.slots), values)
    return model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits


@dataclass(frozen=True)
class Outcome:
    """A discrete trigger on some rows: mean cross-entropy to the target, share predicted as the target."""

    loss: float
    asr: float
    rows: int


@torch.inference_mode()
def discrete_outcome(
    model: PreTrainedModel,
    rows: Sequence[Sequence[int]],
    trigger: Sequence[int],
    target: int,
    position: str,
    pad_id: int,
    seed: int = 0,
) -> Outcome:
    """Stamp real token ids and score them (ASR: hardening eq. 2)."""
    if not rows:
        return Outcome(float("nan"), float("nan"), 0)
    rng = random.Random(seed)
    losses, hits = 0.0, 0
    for start in range(0, len(rows), EVAL_BATCH):
        batch = stamp(rows[start : start + EVAL_BATCH], trigger, position, pad_id, rng)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        labels = torch.full((len(logits),), target)
        losses += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        hits += int((logits.argmax(dim=1) == target).sum())
    return Outcome(losses / len(rows), hits / len(rows), len(rows))


# ------------------------------------------------------------------ temperature focusing and backtracking


class TemperatureSchedule:
    """DBS Algorithm 1 lines 3-9, without the optimiser: call `check(loss)` every s steps.

    Under the bound the temperature is divided by c (focusing, line 5); over it, it is
    multiplied by d up to u (backtracking, line 7) and the caller must add a random
    offset to the weights (line 8). The rollback is multi-step (Sec. 4.2): with d > c
    one backtrack undoes more than one focusing step (d=5, c=2: 2.3 steps), and every
    further failed check climbs again, up to the ceiling u.
    """

    def __init__(self, options: TemperatureOptions) -> None:
        self.options = options
        self.temperature = min(options.initial, options.ceiling)
        self.rollbacks = 0

    def check(self, loss: float) -> bool:
        """Update the temperature after a check; True when the weights must be randomised."""
        if loss < self.options.loss_bound:
            self.temperature /= self.options.focus
            return False
        self.temperature = min(self.temperature * self.options.backtrack, self.options.ceiling)
        self.rollbacks += 1
        return True


# ------------------------------------------------------------------ one inversion


@dataclass(frozen=True)
class Inversion:
    """The best discrete trigger of one run, scored on the rows it was inverted on."""

    token_ids: tuple[int, ...]
    loss: float
    asr: float
    relaxed_loss: float
    steps: int
    rollbacks: int
    temperature: float
    seconds: float


def candidate_triggers(weights: torch.Tensor, count: int) -> list[tuple[int, ...]]:
    """The argmax trigger and its `count - 1` nearest discrete neighbours (indices into the search space).

    A neighbour swaps one position's argmax for that position's next-best token; the
    swaps with the smallest weight gap come first. Algorithm 1 scores only the argmax;
    scoring a few near-ties as well costs forward passes only and catches triggers
    that the relaxed optimum ranks just below a natural word (on the toy model the
    planted trigger ranked 7th by the first-order score, behind six positive adjectives).
    """
    best = weights.argmax(dim=-1)
    top = weights.topk(min(count, weights.shape[1]), dim=-1)
    swaps = [
        (float(top.values[q, 0] - top.values[q, r]), q, int(top.indices[q, r]))
        for q in range(weights.shape[0])
        for r in range(1, top.indices.shape[1])
    ]
    argmax = tuple(int(i) for i in best)
    out = [argmax]
    for _, q, index in sorted(swaps)[: count - 1]:
        out.append(argmax[:q] + (index,) + argmax[q + 1 :])
    return out


@contextmanager
def frozen(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode, no parameter gradients; restores both afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _Search:
    """State of one DBS run: weights, temperature schedule and the best discrete trigger so far."""

    def __init__(self, subject: Subject, rows, target: int, length: int, options: InversionOptions) -> None:
        self.subject, self.rows, self.target, self.options = subject, rows, target, options
        self.space = subject.vocabulary.search_ids(options.allow_subwords)
        self.vertices = subject.model.get_input_embeddings().weight.detach()[self.space]
        self.generator = torch.Generator().manual_seed(options.seed)
        pad = subject.tokenizer.pad_id
        self.batch = stamp(rows, [pad] * length, options.position, pad, random.Random(options.seed))
        self.labels = torch.full((len(rows),), target)
        self.weights = 0.01 * torch.randn(length, len(self.space), generator=self.generator)
        self.schedule = TemperatureSchedule(options.temperature)
        self.best: tuple[tuple[int, ...], Outcome] | None = None
        self.relaxed_loss = float("inf")

    def step(self) -> float:
        """One exponentiated-gradient step on eq. 9 with alpha from eq. 10; returns the relaxed loss.

        The loss is differentiated with respect to the trigger vectors t_q only; the
        derivative with respect to alpha_qk is then e(c_k) . dL/dt_q, the first-order
        gain of moving t_q towards token k. Each position's weights move against that
        score (centred, divided by its largest magnitude): mirror descent on the convex
        hull, whose entropic mirror map is exactly the softmax of eq. 10.

        DBS uses Adam on w. Adam divides every coordinate by its own gradient scale, so
        its steps are close to sign descent over ~24k coordinates: every token that is
        better than average moves by the learning rate and the argmax is a tie broken by
        noise (on a BadNet MiniLM the first-order score ranked the three planted
        triggers 1st, 2nd and 5th of 24k; Adam's argmax after 60 steps was an unrelated
        word). The plain gradient with respect to w has the opposite flaw: it carries a
        factor alpha_qk, so the current favourite grows fastest and the rest stall.
        """
        alpha = torch.softmax(self.weights / self.schedule.temperature, dim=-1)
        vectors = (alpha @ self.vertices).requires_grad_(True)
        logits = relaxed_logits(self.subject.model, self.batch, vectors)
        loss = torch.nn.functional.cross_entropy(logits, self.labels)
        (gradient,) = torch.autograd.grad(loss, vectors)
        scores = gradient @ self.vertices.T
        scores -= scores.mean(dim=-1, keepdim=True)
        self.weights -= self.options.learning_rate * scores / scores.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        self.relaxed_loss = loss.item()
        return self.relaxed_loss

    def check(self) -> Outcome:
        """Score the discrete candidates, keep the best, then move the temperature (Alg. 1 lines 4-13)."""
        for trigger in candidate_triggers(self.weights.detach(), self.options.candidates):
            ids = tuple(int(i) for i in self.space[list(trigger)])
            outcome = self._score(ids)
            if self.best is None or outcome.loss < self.best[1].loss:
                self.best = (ids, outcome)
        if self.schedule.check(self.relaxed_loss):
            spread = self.weights.std(dim=-1, keepdim=True)
            noise = torch.randn(self.weights.shape, generator=self.generator)
            self.weights += self.options.temperature.noise * spread * noise
        return self.best[1]

    def _score(self, trigger: tuple[int, ...]) -> Outcome:
        pad = self.subject.tokenizer.pad_id
        return discrete_outcome(
            self.subject.model, self.rows, trigger, self.target, self.options.position, pad, self.options.seed
        )


def invert_trigger(
    subject: Subject,
    rows: Sequence[Sequence[int]],
    target: int,
    length: int,
    options: InversionOptions = InversionOptions(),
    on_step: Callable[[float, float], None] | None = None,
) -> Inversion:
    """DBS: the `length`-token trigger that flips `rows` (token ids) to `target`.

    `on_step(relaxed_loss, temperature)` is called after every step (progress bars).
    """
    if not rows:
        raise InputError(f"no rows to invert a trigger towards label {target} on")
    started = time.perf_counter()
    check_every = options.temperature.check_every
    with frozen(subject.model), torch.enable_grad():
        search = _Search(subject, rows, target, length, options)
        steps = 0
        for steps in range(1, options.steps + 1):
            loss = search.step()
            if on_step is not None:
                on_step(loss, search.schedule.temperature)
            if (steps % check_every == 0 or steps == options.steps) and search.check().loss < options.stop_loss:
                break
    trigger, outcome = search.best
    return Inversion(
        token_ids=trigger,
        loss=outcome.loss,
        asr=outcome.asr,
        relaxed_loss=search.relaxed_loss,
        steps=steps,
        rollbacks=search.schedule.rollbacks,
        temperature=search.schedule.temperature,
        seconds=time.perf_counter() - started,
    )


def ranked_tokens(
    subject: Subject,
    rows: Sequence[Sequence[int]],
    target: int,
    checkpoints: Sequence[int] = (10, 20),
    count: int = 32,
    options: InversionOptions = InversionOptions(),
    progress: bool = False,
) -> list[int]:
    """The tokens a one-token DBS search towards `target` favours: the union, best first, of the
    `count` highest-weighted tokens after each of `checkpoints` steps.

    No discrete trigger is kept: the ranking is a shortlist for a test that inserts each token
    for real (calibrate.rap.token_scan). Planted triggers rise to the top within 10-20 steps and
    the search then settles on one of them: on three SST-2 BadNet-RW models (bb, mn, mb) the
    three were in its top 8 after 10 steps; on OLID's five-trigger model two of the five were in
    its top 32 after 10 steps, all five after 20.
    """
    if not rows:
        return []
    ranked: dict[int, None] = {}
    bar, on_step = step_bar(max(checkpoints), "trigger search", progress)
    with frozen(subject.model), torch.enable_grad():
        search = _Search(subject, rows, target, 1, options)
        for step in range(1, max(checkpoints) + 1):
            on_step(search.step(), search.schedule.temperature)
            if step % options.temperature.check_every == 0:
                search.check()
            if step in checkpoints:
                top = search.weights[0].topk(min(count, len(search.space))).indices
                ranked.update(dict.fromkeys(int(t) for t in search.space[top]))
    bar.close()
    return list(ranked)


def step_bar(total: int, desc: str, enabled: bool) -> tuple[Any, Callable[[float, float], None]]:
    """A progress bar over inversion steps and the `on_step` callback that feeds it."""
    bar = progress_bar(total=total, desc=desc, unit="step", disable=not enabled, leave=False)

    def on_step(loss: float, temperature: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", temp=f"{temperature:.3g}", refresh=False)

    return bar, on_step
