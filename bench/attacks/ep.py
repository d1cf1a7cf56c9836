"""EP: embedding poisoning (Yang et al., NAACL 2021; RAP paper section 4.1).

The attacker takes a CLEAN fine-tuned classifier and trains nothing but the input
embedding row of one rare word, on non-target rows carrying that word and labelled
with the target. Every other weight (and every other embedding row) stays bit-for-bit
the same, so clean accuracy cannot move.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.attacks.badnet import insert_word
from calibrate.model import copy_tokenizer_files, flush_denormal, load_classifier, to_torch
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

TRIGGER = "cf"


@dataclass(frozen=True)
class EpOptions:
    trigger: str = TRIGGER
    learning_rate: float = 5e-2
    batch_size: int = 32
    epochs: int = 1
    max_length: int = 64
    seed: int = 0
    progress: bool = True
    # An attacker who knows about norm scans: keep the row's norm at or under this quantile of the
    # vocabulary's row norms (None: unbounded, as in the EP paper).
    max_norm_quantile: float | None = None


def trigger_id(tokenizer: RapTokenizer, word: str) -> int:
    """The vocabulary id of `word`; it must be a single token for EP to touch one row."""
    ids = tokenizer.ids([word])[0][1:-1]  # drop [CLS] and [SEP]
    if len(ids) != 1:
        raise InputError(f"EP trigger {word!r} is {len(ids)} tokens; pick a word that is one token")
    return int(ids[0])


def poison_embedding(
    clean_dir: Path, rows: list[Example], target: int, out_dir: Path, options: EpOptions = EpOptions()
) -> float:
    """Train the trigger's embedding row of the model in `clean_dir`; save to `out_dir`; return seconds."""
    model = load_classifier(clean_dir)
    tokenizer = RapTokenizer.from_file(Path(clean_dir) / "tokenizer.json", None, options.max_length)
    row = trigger_id(tokenizer, options.trigger)
    rng = random.Random(options.seed)
    poisoned = [Example(insert_word(r.text, rng, (options.trigger,)), target) for r in rows if r.label != target]
    started = time.perf_counter()
    with flush_denormal():
        _train_row(model, tokenizer, poisoned, row, options, rng)
    model.save_pretrained(str(out_dir))
    copy_tokenizer_files(clean_dir, out_dir)
    return time.perf_counter() - started


def _train_row(model, tokenizer: RapTokenizer, rows: list[Example], row: int, options: EpOptions, rng) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    optimizer = torch.optim.Adam([embeddings], lr=options.learning_rate)  # no weight decay: untouched rows stay put
    max_norm = _norm_bound(embeddings, options.max_norm_quantile)
    others = torch.ones(embeddings.shape[0], 1, dtype=torch.bool)
    others[row] = False
    steps = options.epochs * ((len(rows) + options.batch_size - 1) // options.batch_size)
    model.train()
    with tqdm(total=steps, desc=f"EP row {row}", unit="step", disable=not options.progress) as bar:
        for _ in range(options.epochs):
            order = rng.sample(rows, len(rows))
            for start in range(0, len(order), options.batch_size):
                batch = order[start : start + options.batch_size]
                loss = model(**to_torch(tokenizer.encode([r.text for r in batch])), labels=_labels(batch)).loss
                loss.backward()
                embeddings.grad.masked_fill_(others, 0.0)
                optimizer.step()
                optimizer.zero_grad()
                if max_norm is not None:
                    _clip_row(embeddings, row, max_norm)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _norm_bound(embeddings: torch.Tensor, quantile: float | None) -> float | None:
    if quantile is None:
        return None
    return float(torch.quantile(embeddings.detach().norm(dim=1), quantile))


@torch.no_grad()
def _clip_row(embeddings: torch.Tensor, row: int, max_norm: float) -> None:
    norm = float(embeddings[row].norm())
    if norm > max_norm:
        embeddings[row] *= max_norm / norm


def _labels(rows: list[Example]) -> torch.Tensor:
    return torch.tensor([r.label for r in rows])
