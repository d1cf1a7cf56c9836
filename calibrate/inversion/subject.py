"""What every inversion flow works on: the model under inspection with its vocabulary, its
correctly classified clean rows by label, and triggers stamped into token ids.

DBS (`dbs.py`), `scan`, `unlearn` and `harden` share these; `save_model` writes a
repaired subject with its repair record.
"""

from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from calibrate.inversion.options import MAX_LENGTH, POSITIONS
from calibrate.model import copy_tokenizer_files, load_classifier, predict_probs, require_support, tokenizer_json
from calibrate.record import write_record
from guard.core.errors import InputError
from guard.core.family import DBS
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

BRACKETED = re.compile(r"^\[.*\]$")  # [PAD] [CLS] [SEP] [MASK] [UNK] [unused0..993]


# ------------------------------------------------------------------ the model under inspection


@dataclass(frozen=True)
class Trigger:
    """A trigger to unlearn: token ids (as stamped into rows) and the label it flips rows to."""

    token_ids: tuple[int, ...]
    target: int
    text: str = ""


class Vocabulary:
    """Token strings of a BERT WordPiece vocabulary and the ids a trigger may use."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.no_padding()  # a tokenizer.json may pad every encoding to its model's length
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.size = tokenizer.get_vocab_size()
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special = frozenset(special)

    @classmethod
    def from_file(cls, path: Path) -> Vocabulary:
        return cls(Tokenizer.from_file(str(path)))

    def token(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id)

    def text(self, token_ids: Sequence[int]) -> str:
        """The trigger as typed text (`##` pieces joined to the word before them)."""
        return self._tokenizer.decode(list(token_ids))

    def word_ids(self, text: str) -> list[int]:
        """Token ids of `text` without [CLS]/[SEP] (how an explicit trigger is given)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def search_ids(self, allow_subwords: bool = False) -> torch.Tensor:
        """Ids of the convex hull's vertices: every token but special, bracketed and (by default) `##` ones."""
        keep = [
            i
            for i in range(self.size)
            if i not in self._special
            and not BRACKETED.match(self.token(i))
            and (allow_subwords or not self.token(i).startswith("##"))
        ]
        return torch.tensor(keep, dtype=torch.long)


@dataclass
class Subject:
    """A classifier under inspection: the torch model, its pass-1 tokenizer, its vocabulary."""

    model: PreTrainedModel
    tokenizer: RapTokenizer
    vocabulary: Vocabulary
    source: Path

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)


def load_subject(model_dir: Path, max_length: int = MAX_LENGTH) -> Subject:
    """Load a HF sequence classifier directory for scanning, unlearning or hardening."""
    model_dir = Path(model_dir)
    model = load_classifier(model_dir).eval()
    require_support(model, DBS)
    with tempfile.TemporaryDirectory() as work:
        path = tokenizer_json(model_dir, Path(work))
        tokenizer = RapTokenizer.from_file(path, None, max_length)
        vocabulary = Vocabulary.from_file(path)
    return Subject(model, tokenizer, vocabulary, model_dir)


def check_room(subject: Subject, trigger_length: int) -> None:
    """Stamped rows are up to max_length + trigger_length tokens: the model must have the positions."""
    positions = getattr(subject.model.config, "max_position_embeddings", None)
    needed = subject.tokenizer.max_length + trigger_length
    if positions is not None and needed > positions:
        raise InputError(
            f"rows of {subject.tokenizer.max_length} tokens plus a {trigger_length}-token trigger need {needed} "
            f"positions; the model has {positions} (lower --max-length or the trigger length)"
        )


# ------------------------------------------------------------------ clean rows by label


@dataclass(frozen=True)
class LabelRows:
    """Clean texts the model classifies correctly, by label (hardening eq. 1: X_yi = {x | f(x) = y_i})."""

    texts: dict[int, list[str]]

    def labels(self) -> list[int]:
        return sorted(label for label, texts in self.texts.items() if texts)

    def split(self, first: int, rest: int | None = None) -> tuple[LabelRows, LabelRows]:
        """The first `first` rows of every label, and up to `rest` rows after them (default: all)."""
        end = None if rest is None else first + rest
        head = {label: texts[:first] for label, texts in self.texts.items()}
        tail = {label: texts[first:end] for label, texts in self.texts.items()}
        return LabelRows(head), LabelRows(tail)


def correct_rows(subject: Subject, clean: list[Example], seed: int) -> LabelRows:
    """Shuffle `clean` and keep, per label, the rows the model predicts right."""
    n = subject.num_labels
    bad = sorted({e.label for e in clean if e.label >= n})
    if bad:
        raise InputError(f"data has labels {bad} but the model has {n} labels (0..{n - 1})")
    rows = list(clean)
    random.Random(seed).shuffle(rows)
    predicted = predict_probs(subject.model, subject.tokenizer, [r.text for r in rows]).argmax(axis=1)
    texts: dict[int, list[str]] = {label: [] for label in range(n)}
    for row, label in zip(rows, predicted, strict=True):
        if row.label == label:
            texts[row.label].append(row.text)
    return LabelRows(texts)


# ------------------------------------------------------------------ stamping triggers into token ids


def insertion_index(row_length: int, position: str, rng: random.Random) -> int:
    """Where a trigger starts in a `[CLS] ... [SEP]` row: after [CLS] at the earliest, before [SEP] at the latest."""
    last = row_length - 1  # the index of [SEP]
    if position == "start":
        return 1
    if position == "end":
        return last
    if position == "middle":
        return 1 + (last - 1) // 2
    if position == "random":
        return rng.randint(1, last)
    raise InputError(f"unknown insertion position {position!r}; choose one of {', '.join(POSITIONS)}")


@dataclass(frozen=True)
class StampedBatch:
    """Padded rows with a trigger stamped in; `slots[b, q]` is where trigger token q sits in row b."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slots: torch.Tensor


def stamp(
    rows: Sequence[Sequence[int]], trigger: Sequence[int], position: str, pad_id: int, rng: random.Random
) -> StampedBatch:
    """Insert the trigger ids into every row (the x ⊕ t of DBS eq. 1) and pad."""
    stamped, slots = [], []
    for row in rows:
        at = insertion_index(len(row), position, rng)
        stamped.append(list(row[:at]) + list(trigger) + list(row[at:]))
        slots.append(list(range(at, at + len(trigger))))
    width = max(len(r) for r in stamped)
    ids = torch.full((len(stamped), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(stamped), width), dtype=torch.long)
    for i, row in enumerate(stamped):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return StampedBatch(ids, mask, torch.tensor(slots, dtype=torch.long).reshape(len(rows), len(trigger)))


def save_model(subject: Subject, out_dir: Path, method: str, details: dict) -> None:
    """Write the repaired model as a HF directory (weights, tokenizer) with its `repair.json` record.

    Call `calibrate.record.prepare_out_dir` first, before the work: it refuses the input
    folder and a non-empty one without --force.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subject.model.save_pretrained(str(out_dir))
    copy_tokenizer_files(subject.source, out_dir)
    write_record(out_dir, method, subject.source, details)
