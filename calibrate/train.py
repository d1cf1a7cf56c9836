"""Fine-tune a sequence classifier (for demos and benchmarks; users bring their own).

`train_classifier` puts a fresh head on an encoder; `fine_tune` keeps training an
existing classifier, head and label names included (the FT baseline of the repair
papers, and the last stage of PURE and MEFT, which pass their own loss to `fit`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from calibrate.data import label_counts
from calibrate.model import (
    copy_tokenizer_files,
    flush_denormal,
    load_classifier,
    predict_probs,
    to_torch,
    tokenizer_json,
)
from calibrate.options import TrainOptions
from calibrate.progress import progress_bar
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger(__name__)

LossFn = Callable[[PreTrainedModel, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def cross_entropy(model: PreTrainedModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return model(**inputs, labels=labels).loss


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    seconds: float
    train_rows: int
    dev_accuracy: float | None


def train_classifier(
    base: Path,
    train: list[Example],
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    dev: list[Example] | None = None,
    loss_fn: LossFn = cross_entropy,
) -> TrainResult:
    """Fine-tune `base` with a fresh head on `train`, save a HF model dir (weights + tokenizer) to `out_dir`.
    `loss_fn`: cross-entropy, or a benchmark attack's own loss (bench/attacks/adaptive.py)."""
    num_labels = max(_check_rows(train, options)) + 1
    seed_everything(options.seed)
    model = load_classifier(base, num_labels=num_labels)
    _name_labels(model, options.label_names)
    if model.config.num_labels != num_labels:
        raise InputError(f"{base} has {model.config.num_labels} labels but the data uses labels 0..{num_labels - 1}")
    return _train_and_save(model, Path(base), train, out_dir, options, dev, loss_fn)


def fine_tune(
    model_dir: Path,
    train: list[Example],
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    dev: list[Example] | None = None,
) -> TrainResult:
    """Keep training the classifier in `model_dir` (its head and label names kept) on `train`; save to `out_dir`."""
    _check_rows(train, options)
    seed_everything(options.seed)
    model = load_classifier(model_dir)
    check_labels(model, train)
    _name_labels(model, options.label_names)
    return _train_and_save(model, Path(model_dir), train, out_dir, options, dev)


def check_labels(model: PreTrainedModel, rows: list[Example]) -> None:
    n = model.config.num_labels
    bad = sorted({r.label for r in rows if r.label >= n})
    if bad:
        raise InputError(f"data has labels {bad} but the model has {n} labels (0..{n - 1})")


def load_tokenizer(model_dir: Path, out_dir: Path, max_length: int) -> RapTokenizer:
    """The model's tokenizer; a model without tokenizer.json gets one converted into `out_dir`."""
    return RapTokenizer.from_file(tokenizer_json(model_dir, Path(out_dir)), None, max_length)


def _check_rows(train: list[Example], options: TrainOptions) -> dict[int, int]:
    counts = label_counts(train)
    if len(counts) < 2:
        raise InputError(f"training data has a single label ({next(iter(counts))}); need at least two")
    if len(train) < options.batch_size:
        raise InputError(f"training data has {len(train)} rows; need at least one batch ({options.batch_size})")
    return counts


def _train_and_save(
    model: PreTrainedModel,
    src_dir: Path,
    train: list[Example],
    out_dir: Path,
    options: TrainOptions,
    dev: list[Example] | None,
    loss_fn: LossFn = cross_entropy,
) -> TrainResult:
    tokenizer = load_tokenizer(src_dir, out_dir, options.max_length)
    started = time.perf_counter()
    with flush_denormal():
        fit(model, tokenizer, train, options, loss_fn)
    seconds = time.perf_counter() - started
    model.save_pretrained(str(out_dir))
    copy_tokenizer_files(src_dir, out_dir)
    dev_accuracy = accuracy(model, tokenizer, dev) if dev else None
    return TrainResult(out_dir=Path(out_dir), seconds=seconds, train_rows=len(train), dev_accuracy=dev_accuracy)


def _name_labels(model, names: tuple[str, ...]) -> None:
    if not names:
        return
    if len(names) != model.config.num_labels:
        raise InputError(f"{len(names)} label names given for {model.config.num_labels} labels")
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def fit(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    train: list[Example],
    options: TrainOptions,
    loss_fn: LossFn = cross_entropy,
    desc: str = "fine-tuning",
) -> None:
    """AdamW with linear warm-up and decay over `options.epochs`; trains whatever requires grad."""
    steps_per_epoch = (len(train) + options.batch_size - 1) // options.batch_size
    total = steps_per_epoch * options.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(total * options.warmup_ratio), total)
    model.train()
    bar = progress_bar(total=total, desc=desc, unit="step", disable=not options.progress)
    for _ in range(options.epochs):
        order = list(range(len(train)))
        random.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            rows = [train[i] for i in order[start : start + options.batch_size]]
            inputs = to_torch(tokenizer.encode([r.text for r in rows]))
            loss = loss_fn(model, inputs, torch.tensor([r.label for r in rows]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def accuracy(model: PreTrainedModel, tokenizer: RapTokenizer, rows: list[Example]) -> float:
    probs = predict_probs(model, tokenizer, [r.text for r in rows])
    return float(np.mean(probs.argmax(axis=1) == np.array([r.label for r in rows])))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
