"""Fine-tune a sequence classifier (for demos and benchmarks; users bring their own)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from calibrate.data import label_counts
from calibrate.model import copy_tokenizer_files, flush_denormal, load_classifier, predict_probs, to_torch
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.06
    seed: int = 13
    label_names: tuple[str, ...] = ()  # e.g. ("negative", "positive"); default LABEL_0, LABEL_1...
    progress: bool = True


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
) -> TrainResult:
    """Fine-tune `base` on `train`, save a HF model dir (weights + tokenizer) to `out_dir`."""
    counts = label_counts(train)
    num_labels = max(counts) + 1
    if len(counts) < 2:
        raise InputError(f"training data has a single label ({next(iter(counts))}); need at least two")
    if len(train) < options.batch_size:
        raise InputError(f"training data has {len(train)} rows; need at least one batch ({options.batch_size})")
    _seed(options.seed)
    model = load_classifier(base, num_labels=num_labels)
    _name_labels(model, options.label_names)
    if model.config.num_labels != num_labels:
        raise InputError(f"{base} has {model.config.num_labels} labels but the data uses labels 0..{num_labels - 1}")
    tokenizer = RapTokenizer.from_file(Path(base) / "tokenizer.json", None, options.max_length)
    started = time.perf_counter()
    with flush_denormal():
        _fit(model, tokenizer, train, options)
    seconds = time.perf_counter() - started
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    copy_tokenizer_files(base, out_dir)
    accuracy = _accuracy(model, tokenizer, dev) if dev else None
    return TrainResult(out_dir=out_dir, seconds=seconds, train_rows=len(train), dev_accuracy=accuracy)


def _name_labels(model, names: tuple[str, ...]) -> None:
    if not names:
        return
    if len(names) != model.config.num_labels:
        raise InputError(f"{len(names)} label names given for {model.config.num_labels} labels")
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def _fit(model, tokenizer: RapTokenizer, train: list[Example], options: TrainOptions) -> None:
    steps_per_epoch = (len(train) + options.batch_size - 1) // options.batch_size
    total = steps_per_epoch * options.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(total * options.warmup_ratio), total)
    model.train()
    bar = tqdm(total=total, desc="fine-tuning", unit="step", disable=not options.progress)
    for _ in range(options.epochs):
        order = list(range(len(train)))
        random.shuffle(order)
        for start in range(0, len(order), options.batch_size):
            rows = [train[i] for i in order[start : start + options.batch_size]]
            inputs = to_torch(tokenizer.encode([r.text for r in rows]))
            labels = torch.tensor([r.label for r in rows])
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def _accuracy(model, tokenizer: RapTokenizer, rows: list[Example]) -> float:
    probs = predict_probs(model, tokenizer, [r.text for r in rows])
    return float(np.mean(probs.argmax(axis=1) == np.array([r.label for r in rows])))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
