"""Tokenisation for both RAP passes.

Pass 1 is the model's ordinary input. Pass 2 is the same text with the RAP
token inserted right after [CLS]. The RAP token is a fresh id (the old vocab
size), so the tokenizer can never emit it from text: it is spliced in as an id.
Pass 2 truncates its text one token earlier than pass 1 so that the RAP token
and the final [SEP] always survive truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from guard.core.errors import BundleError, InputError
from guard.core.types import EncodedBatch

RAP_POSITION = 1  # right after [CLS]


class RapTokenizer:
    """Wraps a Hugging Face fast tokenizer (`tokenizer.json`, BERT-style)."""

    def __init__(self, tokenizer: Tokenizer, rap_token_id: int | None, max_length: int) -> None:
        if max_length < 4:
            raise InputError(f"max_length must be at least 4, got {max_length}")
        # Two configured copies instead of toggling truncation per call, so one
        # RapTokenizer can be shared by concurrent callers.
        self._pass1 = _configured(tokenizer, max_length)
        self._pass2 = _configured(tokenizer, max_length - 1)
        self.rap_token_id = rap_token_id
        self.max_length = max_length
        self.pad_id = _special_id(tokenizer, "[PAD]")
        self.cls_id = _special_id(tokenizer, "[CLS]")

    @classmethod
    def from_file(cls, path: Path, rap_token_id: int | None, max_length: int) -> RapTokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exception subclasses
            raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(tok, rap_token_id, max_length)

    @property
    def vocab_size(self) -> int:
        return self._pass1.get_vocab_size()

    def token_id(self, word: str) -> int | None:
        return self._pass1.token_to_id(word)

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Pass-1 inputs: `[CLS] text [SEP]`, truncated to max_length, padded."""
        return self.pad(self.ids(texts))

    def encode_perturbed(self, texts: Sequence[str]) -> EncodedBatch:
        """Pass-2 inputs: `[CLS] RAP text [SEP]`, truncated to max_length, padded."""
        return self.pad(self.perturbed_ids(texts))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded pass-1 token ids (a batcher pads rows from many requests together)."""
        return self._ids(self._pass1, texts)

    def perturbed_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded pass-2 token ids: the RAP id right after [CLS]."""
        if self.rap_token_id is None:
            raise BundleError("this tokenizer has no RAP token id; it cannot build pass-2 inputs")
        rows = self._ids(self._pass2, texts)
        return [row[:RAP_POSITION] + [self.rap_token_id] + row[RAP_POSITION:] for row in rows]

    def pad(self, rows: Sequence[Sequence[int]]) -> EncodedBatch:
        """Pad rows to the longest one; attention mask marks real tokens."""
        return _pad(rows, self.pad_id)

    def _ids(self, tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
        _check_texts(texts)
        encodings = tokenizer.encode_batch(list(texts))
        rows = [list(enc.ids) for enc in encodings]
        if rows and rows[0][:1] != [self.cls_id]:
            raise BundleError("tokenizer does not start sequences with [CLS]; only BERT-style tokenizers are supported")
        return rows


def _configured(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length=max_length)
    return copy


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise InputError("expected a sequence of texts, got a single string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i} is {type(text).__name__}, expected str")


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise BundleError(f"tokenizer has no {token} token; only BERT-style tokenizers are supported")
    return token_id


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> EncodedBatch:
    width = max((len(row) for row in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return EncodedBatch(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
