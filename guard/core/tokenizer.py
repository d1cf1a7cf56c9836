"""Tokenisation for both RAP passes, and the windows that cover a long text.

Pass 1 is the model's ordinary input: `[CLS] text [SEP]`. Pass 2 is the same row
with the RAP token inserted right after [CLS]. The RAP token is a fresh id (the
old vocab size), so the tokenizer can never emit it from text: it is spliced in
as an id.

Both passes read exactly the same text tokens: a text token one pass sees and the
other does not would be a bypass (a trigger placed there is read by the classifier
but never perturbed). Pass 2 is one token longer, so both keep `max_length - 3`
text tokens and pass 2 fills `max_length` exactly. Pass-2 rows are built from
pass-1 rows, never tokenised twice.

A protected classifier may read more text than the guard's window (a sidecar in
front of a 512-token model, or `ALL_TOKENS`: one whose window is unknown). `windows`
then cuts the text tokens it reads into overlapping windows, each a pass-1 row of its
own; the guard flags the text when any window flags.

Only what the windows use is tokenised: a text is read in growing prefixes until one
yields `PREFIX_MARGIN_TOKENS` more tokens than needed, or the text ends. Never cut by
characters alone: characters can yield no token at all (zero-width, control, combining
marks the normaliser strips), so 10,000 of them before a trigger must not hide it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from guard.core.errors import BundleError, InputError
from guard.core.types import EncodedBatch

RAP_POSITION = 1  # right after [CLS]
SpecialTokens = Literal["text", "special"]
ALL_TOKENS: Literal["all"] = "all"  # a classifier window: every token of the text (a window not known)
ClassifierWindow = int | Literal["all"] | None  # None: the guard's own window
# A cut can change only the tokens of the word (or special token) it splits: WordPiece reads a word of up
# to 100 characters (at most 100 tokens, one [UNK] beyond), so tokens this far before the cut are final.
PREFIX_MARGIN_TOKENS = 128
FIRST_PREFIX_CHARS_PER_TOKEN = 8  # the first prefix read: this many characters per token needed


@dataclass(frozen=True)
class Windows:
    """Pass-1 rows for a batch of texts: `owner[i]` is the text row `i` belongs to;
    `lengths[t]` is how many text tokens of text `t` the classifier reads (before any window)."""

    rows: list[list[int]]
    owner: list[int]
    lengths: list[int]

    def first_rows(self) -> list[int]:
        """Index of each text's first window (texts are in order, each has one or more)."""
        return [i for i, text in enumerate(self.owner) if i == 0 or self.owner[i - 1] != text]


class RapTokenizer:
    """Wraps a Hugging Face fast tokenizer (`tokenizer.json`, BERT-style).

    `special_tokens`: "text" reads `[SEP]`, `[PAD]`, ... inside a text as plain text
    (the safe default); "special" reads them as their special ids, as a Hugging Face
    classifier behind a sidecar does. The guard must read text as the classifier does.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        rap_token_id: int | None,
        max_length: int,
        special_tokens: SpecialTokens = "text",
    ) -> None:
        if max_length < 4:
            raise InputError(f"max_length must be at least 4, got {max_length}")
        if special_tokens not in ("text", "special"):
            raise InputError(f"special_tokens must be 'text' or 'special', got {special_tokens!r}")
        self._tokenizer = _configured(tokenizer, special_tokens)
        self.rap_token_id = rap_token_id
        self.max_length = max_length
        self.text_window = max_length - 3  # [CLS] RAP ... [SEP] fills max_length in pass 2
        self.special_tokens = special_tokens
        self.pad_id = _special_id(tokenizer, "[PAD]")
        self.cls_id = _special_id(tokenizer, "[CLS]")
        self.sep_id = _special_id(tokenizer, "[SEP]")
        self._special_ids = frozenset(tokenizer.get_added_tokens_decoder())

    @classmethod
    def from_file(
        cls, path: Path, rap_token_id: int | None, max_length: int, special_tokens: SpecialTokens = "text"
    ) -> RapTokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exception subclasses
            raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(tok, rap_token_id, max_length, special_tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special tokens ([CLS], [SEP], [PAD], ...)."""
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def token_id(self, word: str) -> int | None:
        return self._tokenizer.token_to_id(word)

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id) or f"<id {token_id}>"

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Pass-1 inputs: `[CLS] text [SEP]`, the text cut to `text_window` tokens, padded."""
        return self.pad(self.ids(texts))

    def encode_perturbed(self, texts: Sequence[str]) -> EncodedBatch:
        """Pass-2 inputs: `[CLS] RAP text [SEP]`, the same text tokens as pass 1, padded."""
        return self.pad(self.perturbed_ids(texts))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded pass-1 token ids, one row per text (its first window)."""
        return [self._row(content) for content in self._content(texts, self.text_window)]

    def perturbed_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded pass-2 token ids: the RAP id right after [CLS]."""
        return self.perturb(self.ids(texts))

    def perturb(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Pass-2 rows from pass-1 rows: the same tokens with the RAP id after [CLS]."""
        if self.rap_token_id is None:
            raise BundleError("this tokenizer has no RAP token id; it cannot build pass-2 inputs")
        return [[*row[:RAP_POSITION], self.rap_token_id, *row[RAP_POSITION:]] for row in rows]

    def windows(self, texts: Sequence[str], classifier_max_length: ClassifierWindow = None) -> Windows:
        """Pass-1 rows covering every text token a classifier of that window reads.

        `classifier_max_length` is the protected classifier's window, [CLS] and [SEP]
        included: None is the guard's own, `ALL_TOKENS` every token of the text. Text it
        reads beyond `text_window` tokens is covered by windows that overlap by half, so
        any span of up to half a window lies whole inside one of them. A text with no
        token the model reads is an InputError.
        """
        reading = self.reading(texts, classifier_max_length)
        while not reading.read_round():
            pass
        return reading.windows()

    def reading(self, texts: Sequence[str], classifier_max_length: ClassifierWindow = None) -> Reading:
        """`windows`, a round of tokenising at a time (for a caller that admits each round's cost)."""
        return Reading(self, texts, self.reads(classifier_max_length))

    def windows_of(self, contents: Sequence[Sequence[int]]) -> Windows:
        """The windows over each text's tokens (see `windows`)."""
        rows, owner, lengths = [], [], []
        for i, content in enumerate(contents):
            if not any(t not in self._special_ids for t in content):
                raise InputError(f"text {i} is empty: it has no token the model reads")
            for start in window_starts(len(content), self.text_window):
                rows.append(self._row(content[start : start + self.text_window]))
                owner.append(i)
            lengths.append(len(content))
        return Windows(rows, owner, lengths)

    def reads(self, classifier_max_length: ClassifierWindow) -> int | None:
        """Text tokens a classifier of that window reads (None: all of them)."""
        if classifier_max_length == ALL_TOKENS:
            return None
        return self.text_window if classifier_max_length is None else max(classifier_max_length - 2, 1)

    def pad(self, rows: Sequence[Sequence[int]]) -> EncodedBatch:
        """Pad rows to the longest one; attention mask marks real tokens."""
        return _pad(rows, self.pad_id)

    def _row(self, content: Sequence[int]) -> list[int]:
        return [self.cls_id, *content, self.sep_id]

    def _content(self, texts: Sequence[str], reads: int) -> list[list[int]]:
        """Text token ids without [CLS]/[SEP]: the first `reads` of each text."""
        reading = Reading(self, texts, reads)
        while not reading.read_round():
            pass
        return reading.contents

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        except Exception as exc:  # tokenizers raises TypeError/Exception on text it cannot read
            raise InputError(_unreadable(texts, exc)) from None
        return [list(enc.ids) for enc in encodings]


class Reading:
    """Texts tokenised in rounds of growing prefixes: each round's cost (`round_chars`) is known before it runs.

    A prefix's tokens are kept only when it yields `PREFIX_MARGIN_TOKENS` more than the
    `reads` needed (the cut changed none of them) or it is the whole text; the others are
    read again, twice as far, in the next round. `reads` None: every token, in one round.
    """

    def __init__(self, tokenizer: RapTokenizer, texts: Sequence[str], reads: int | None) -> None:
        _check_texts(texts)
        self._tokenizer, self._texts, self._reads = tokenizer, list(texts), reads
        self.contents: list[list[int]] = [[] for _ in self._texts]
        self._todo = list(range(len(self._texts)))
        longest = max((len(text) for text in self._texts), default=0)
        self._size = longest if reads is None else FIRST_PREFIX_CHARS_PER_TOKEN * (reads + PREFIX_MARGIN_TOKENS)

    @property
    def round_chars(self) -> int:
        """Characters the next round tokenises."""
        return sum(min(len(self._texts[i]), self._size) for i in self._todo)

    def read_round(self) -> bool:
        """Tokenise the next round; True once every text is read."""
        if self._todo:
            encoded = self._tokenizer._encode([self._texts[i][: self._size] for i in self._todo])
            todo = []
            for i, ids in zip(self._todo, encoded, strict=True):
                if len(self._texts[i]) <= self._size or len(ids) >= self._reads + PREFIX_MARGIN_TOKENS:
                    self.contents[i] = ids[: self._reads]
                else:
                    todo.append(i)
            self._todo, self._size = todo, 2 * self._size
        return not self._todo

    def windows(self) -> Windows:
        return self._tokenizer.windows_of(self.contents)


def window_starts(length: int, window: int) -> list[int]:
    """Start offsets of windows of `window` tokens, half overlapping, covering `length` tokens."""
    if length <= window:
        return [0]
    stride = max(window // 2, 1)
    starts = list(range(0, length - window, stride))
    return [*starts, length - window]


def _configured(tokenizer: Tokenizer, special_tokens: SpecialTokens) -> Tokenizer:
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = special_tokens == "text"
    return copy


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise InputError("expected a sequence of texts, got a single string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i} is {type(text).__name__}, expected str")


def _unreadable(texts: Sequence[str], exc: Exception) -> str:
    """Why the tokenizer refused: found only on this error path, so readable text pays nothing."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"text {i} is not valid Unicode (it holds a lone surrogate)"
    return f"cannot tokenise the text: {exc}"


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
