"""MEFT (Liu et al., Findings of ACL 2023): maximum-entropy fine-tuning, then cross-entropy.

A backdoor is learned by minimising cross-entropy on poisoned rows, which drives
predictions towards zero entropy (section 4.2, eq. 1). MEFT runs that in reverse on
clean rows (section 4.3):

1. freeze the encoder and train an output layer on it with cross-entropy, simulating
   the attacker's head (needed when only the encoder is trusted to be the attacker's;
   `fresh_head=False` keeps the classifier's own head, the paper's outsourcing case);
2. freeze that head and fine-tune the encoder to MAXIMISE prediction entropy (eq. 3;
   here the mean over the batch rather than the sum) until the stop distance (SD) falls
   below a threshold: SD = ||c_i - c_j||^2 for the centroids c of the [CLS]
   representations (last hidden layer) of two labels. With more than two labels the
   paper picks two at random; here SD is the largest over all pairs, so it stops only
   when every pair of labels has been pulled together;
3. fine-tune everything with cross-entropy on the clean rows.

SD is measured on a fixed sample of the clean rows, in eval mode, every `check_every`
steps; the curve and the steps taken go into the repair record and a picture.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import torch
from transformers import PreTrainedModel

from calibrate.data import label_counts, load_examples
from calibrate.model import copy_tokenizer_files, flush_denormal, load_classifier, require_support, to_torch
from calibrate.progress import progress_bar
from calibrate.record import prepare_out_dir, write_record
from calibrate.repair.options import MaxEntJob, MaxEntOptions
from calibrate.train import accuracy, check_labels, fit, load_tokenizer, seed_everything
from guard.core.errors import InputError
from guard.core.family import MEFT
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

PLOT = "stop_distance.png"


@dataclass
class MaxEntResult:
    out_dir: Path
    steps: int  # maximum-entropy steps taken
    reached: bool  # the stop distance fell below the threshold within max_steps
    curve: list[tuple[int, float]]  # (step, stop distance), from step 0
    dev_accuracy: dict[str, float] = field(default_factory=dict)  # after "head", "maxent", "final" (with dev rows)
    seconds: dict[str, float] = field(default_factory=dict)


def maxent_repair(
    model_dir: Path,
    train: list[Example],
    out_dir: Path,
    options: MaxEntOptions = MaxEntOptions(),
    dev: list[Example] | None = None,
    force: bool = False,
) -> MaxEntResult:
    """Run MEFT on the classifier in `model_dir` with clean `train` rows; save it to `out_dir`.

    Writes `repair.json` (steps, stop-distance curve, timings) and `stop_distance.png` beside
    the model. `dev` rows, if given, are only measured, after each phase."""
    prepare_out_dir(model_dir, out_dir, force)
    started = time.perf_counter()
    model = load_classifier(model_dir)
    require_support(model, MEFT)
    tokenizer = load_tokenizer(model_dir, out_dir, options.finetune.max_length)
    for rows in (train, dev or []):
        check_labels(model, rows)
    seed_everything(options.finetune.seed)
    probe = _distance_probe(train, options)
    with flush_denormal():
        result = _repair(model, tokenizer, train, probe, dev, Path(out_dir), options)
    model.save_pretrained(str(out_dir))
    copy_tokenizer_files(model_dir, out_dir)
    result.seconds["total"] = round(time.perf_counter() - started, 2)
    plot_stop_distance(Path(out_dir) / PLOT, result.curve, options.stop_distance)
    write_record(out_dir, "maxent", model_dir, _record(result, options))
    return result


def _repair(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    train: list[Example],
    probe: list[Example],
    dev: list[Example] | None,
    out_dir: Path,
    options: MaxEntOptions,
) -> MaxEntResult:
    result = MaxEntResult(out_dir=out_dir, steps=0, reached=False, curve=[])
    with _phase(result, "head", model, tokenizer, dev):
        simulate_head(model, tokenizer, train, options)
    with _phase(result, "maxent", model, tokenizer, dev):
        result.steps, result.curve = maximise_entropy(model, tokenizer, train, probe, options)
        result.reached = result.curve[-1][1] < options.stop_distance
    with _phase(result, "final", model, tokenizer, dev):
        finetune = replace(options.finetune, progress=options.progress)
        fit(model, tokenizer, train, finetune, desc="cross-entropy fine-tuning")
    return result


@contextmanager
def _phase(
    result: MaxEntResult, name: str, model: PreTrainedModel, tokenizer: RapTokenizer, dev: list[Example] | None
) -> Iterator[None]:
    """Time a phase; measure dev accuracy after it."""
    started = time.perf_counter()
    yield
    result.seconds[name] = round(time.perf_counter() - started, 2)
    if dev:
        result.dev_accuracy[name] = accuracy(model, tokenizer, dev)


# ---------------------------------------------------------------- the losses and the stop distance


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's predicted distribution, -sum_c q_c log q_c (eq. 3 per input)."""
    log_q = torch.log_softmax(logits, dim=-1)
    return -(log_q.exp() * log_q).sum(dim=-1)


def max_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Minimising this maximises the mean entropy of the batch (eq. 3, mean instead of sum)."""
    return -entropy(logits).mean()


def stop_distance(representations: torch.Tensor, labels: torch.Tensor) -> float:
    """SD (section 4.2): squared distance between the centroids of two labels' representations;
    the largest over every pair of labels present."""
    present = torch.unique(labels)
    if len(present) < 2:
        raise InputError("the stop distance needs rows of at least two labels")
    centroids = torch.stack([representations[labels == label].double().mean(dim=0) for label in present])
    pairs = itertools.combinations(range(len(present)), 2)
    return max(float(((centroids[i] - centroids[j]) ** 2).sum()) for i, j in pairs)


@torch.inference_mode()
def cls_representations(
    model: PreTrainedModel, tokenizer: RapTokenizer, texts: list[str], batch_size: int = 64
) -> torch.Tensor:
    """Last-layer hidden state at the [CLS] position, (texts, hidden)."""
    model.eval()
    rows = []
    for start in range(0, len(texts), batch_size):
        out = model(**to_torch(tokenizer.encode(texts[start : start + batch_size])), output_hidden_states=True)
        rows.append(out.hidden_states[-1][:, 0])
    return torch.cat(rows)


def _distance_probe(train: list[Example], options: MaxEntOptions) -> list[Example]:
    rows = random.Random(options.finetune.seed).sample(train, min(options.distance_rows, len(train)))
    if len(label_counts(rows)) < 2:
        raise InputError(f"the clean rows need at least two labels to measure the stop distance ({label_counts(rows)})")
    return rows


# ---------------------------------------------------------------- phases


def simulate_head(
    model: PreTrainedModel, tokenizer: RapTokenizer, train: list[Example], options: MaxEntOptions
) -> None:
    """Phase 1: a freshly initialised head trained on the frozen encoder (no-op with fresh_head=False)."""
    if not options.fresh_head:
        return
    head = _head_parameters(model)
    _reinitialise_head(model)
    head_options = replace(options.head, max_length=options.finetune.max_length, progress=options.progress)
    with _only_trainable(model, head):
        fit(model, tokenizer, train, head_options, desc="simulated head")


def maximise_entropy(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    train: list[Example],
    probe: list[Example],
    options: MaxEntOptions,
) -> tuple[int, list[tuple[int, float]]]:
    """Phase 2: encoder trained to maximise entropy, head frozen, until SD < threshold or
    `max_steps`. Returns the steps taken and the SD curve [(step, SD), ...] from step 0."""
    texts, labels = [r.text for r in probe], torch.tensor([r.label for r in probe])

    def distance() -> float:
        return stop_distance(cls_representations(model, tokenizer, texts), labels)

    encoder = [p for name, p in model.named_parameters() if name.startswith(f"{model.base_model_prefix}.")]
    optimizer = torch.optim.AdamW(encoder, lr=options.learning_rate, weight_decay=0.01)
    batches = _endless_batches(train, options.batch_size, random.Random(options.finetune.seed))
    curve = [(0, distance())]
    step = 0
    bar = progress_bar(total=options.max_steps, desc="maximum entropy", unit="step", disable=not options.progress)
    with _only_trainable(model, encoder):
        while curve[-1][1] >= options.stop_distance and step < options.max_steps:
            step += 1
            loss = _entropy_step(model, tokenizer, next(batches), optimizer)
            if step % options.check_every == 0 or step == options.max_steps:
                curve.append((step, distance()))
            bar.update(1)
            bar.set_postfix(entropy=f"{-loss:.4f}", stop_distance=f"{curve[-1][1]:.4f}")
    bar.close()
    model.eval()
    return step, curve


def _entropy_step(
    model: PreTrainedModel, tokenizer: RapTokenizer, rows: list[Example], optimizer: torch.optim.Optimizer
) -> float:
    model.train()
    loss = max_entropy_loss(model(**to_torch(tokenizer.encode([r.text for r in rows]))).logits)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.item())


def _endless_batches(rows: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Shuffled batches, epoch after epoch (the phase ends on the stop distance, not on epochs)."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [rows[i] for i in order[start : start + batch_size]]


def _head_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    head = [p for name, p in model.named_parameters() if not name.startswith(f"{model.base_model_prefix}.")]
    if not head:
        raise InputError(f"cannot tell the output layer of this {model.config.model_type} model from its encoder")
    return head


def _reinitialise_head(model: PreTrainedModel) -> None:
    """Every linear layer outside the encoder gets the model's own initialisation (normal, zero bias)."""
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, module in model.named_children():
            if name == model.base_model_prefix:
                continue
            for layer in module.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0.0, std)
                    if layer.bias is not None:
                        layer.bias.zero_()


@contextmanager
def _only_trainable(model: PreTrainedModel, params: list[torch.nn.Parameter]) -> Iterator[None]:
    chosen = {id(p) for p in params}
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


# ---------------------------------------------------------------- report


def plot_stop_distance(path: Path, curve: list[tuple[int, float]], threshold: float) -> None:
    """Stop distance against maximum-entropy steps, log scale, with the threshold line."""
    steps, distances = zip(*curve, strict=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, distances, marker="o", markersize=3)
    ax.axhline(threshold, linestyle="--", color="black", linewidth=1, label=f"threshold {threshold:g}")
    if min(distances) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("maximum-entropy steps")
    ax.set_ylabel("stop distance (squared centroid distance)")
    ax.set_title("MEFT: class centroids of the [CLS] representation pulled together")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _record(result: MaxEntResult, options: MaxEntOptions) -> dict:
    return {
        "options": asdict(options),
        "steps": result.steps,
        "reached_stop_distance": result.reached,
        "stop_distance_curve": [{"step": s, "distance": d} for s, d in result.curve],
        "dev_accuracy": result.dev_accuracy,
        "seconds": result.seconds,
        "plot": PLOT,
    }


def run_meft(job: MaxEntJob, say: Callable[[str], None] = print) -> MaxEntResult:
    """`calibrate maxent`: MEFT on the job's model and rows; print the stop distance and accuracies."""
    dev = load_examples(job.dev) if job.dev else None
    result = maxent_repair(job.model, load_examples(job.data), job.out, job.options, dev=dev, force=job.force)
    outcome = "reached" if result.reached else "NOT reached (budget spent; raise --max-steps or --maxent-lr)"
    say(
        f"maximum entropy: {result.steps} steps, stop distance {result.curve[0][1]:.4g} -> "
        f"{result.curve[-1][1]:.4g}, threshold {job.options.stop_distance:g} {outcome}"
    )
    if dev:
        say("dev accuracy: " + ", ".join(f"after {k} {v:.4f}" for k, v in result.dev_accuracy.items()))
    say(f"saved {job.out} in {result.seconds['total']:.0f} s (record: {Path(job.out) / 'repair.json'}, {PLOT})")
    return result
