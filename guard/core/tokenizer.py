"""Tokenisation for both RAP passes, and the windows that cover a long text.

Pass 1 is the model's ordinary input: the text framed by the tokenizer's own special
tokens (`[CLS] text [SEP]`, `<s> text </s>`, ...: its post-processor says which, see
`Framing`). Pass 2 is the same row with the RAP token inserted at the bundle's
`rap_position` (guard.core.family): right after the first special token ("front"), or
right before the trailing ones ("end"). The RAP token is a fresh id (the old vocab size), so
the tokenizer can never emit it from text: it is spliced in as an id.

Every `tokenizer.json` kind reads text the way Hugging Face does with the same file
(WordPiece, byte-level BPE with its leading-space pieces, SentencePiece Unigram/BPE):
the text is encoded without special tokens and framed here, and a window's tokens are
taken from the whole text's tokens, so a window never re-reads a word without the space
before it.

Both passes read exactly the same text tokens: a text token one pass sees and the
other does not would be a bypass (a trigger placed there is read by the classifier
but never perturbed). Pass 2 is one token longer, so both keep `max_length - 3`
text tokens (with one framing token on each side) and pass 2 fills `max_length` exactly. Pass-2 rows are built from
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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from guard.core.errors import BundleError, InputError
from guard.core.family import RAP_AFTER, RAP_POSITIONS, RapPosition
from guard.core.types import EncodedBatch

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # where a pad token is named, beside tokenizer.json
SpecialTokens = Literal["text", "special"]
ALL_TOKENS: Literal["all"] = "all"  # a classifier window: every token of the text (a window not known)
ClassifierWindow = int | Literal["all"] | None  # None: the guard's own window
# A cut can change only the tokens of the word (or special token) it splits: WordPiece reads a word of up
# to 100 characters (at most 100 tokens, one [UNK] beyond), so tokens this far before the cut are final.
PREFIX_MARGIN_TOKENS = 128
FIRST_PREFIX_CHARS_PER_TOKEN = 8  # the first prefix read: this many characters per token needed
WORD_CONTEXT = "the"  # what a word follows in `word_id` (a word after a space, as in a sentence)
WORD_MARKERS = "Ġ▁"  # how byte-level BPE and SentencePiece mark a piece that starts after a space


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


@dataclass(frozen=True)
class Framing:
    """A row's special tokens, from the tokenizer's own configuration (never from spelled names).

    `prefix` and `suffix` are the ids its post-processor puts before and after a single
    text (`[CLS]`/`[SEP]`, `<s>`/`</s>`); `pad_id` is its padding id: tokenizer.json's
    padding, else the `pad_token` that tokenizer_config.json or special_tokens_map.json
    names. RoBERTa-style models find padding by this id, so a wrong one moves positions.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, config: Mapping[str, object] | None = None) -> Framing:
        probe = Tokenizer.from_str(tokenizer.to_str())
        probe.no_padding()
        probe.no_truncation()
        mask = probe.encode("a", add_special_tokens=True).special_tokens_mask
        lead = next((i for i, m in enumerate(mask) if not m), len(mask))
        trail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
        ids = probe.encode("a", add_special_tokens=True).ids
        if lead == 0 or lead == len(mask):
            raise BundleError(
                "the tokenizer's post-processor puts no special token before the text; "
                "the guard frames its rows as the model reads them and needs one ([CLS], <s>)"
            )
        return cls(tuple(ids[:lead]), tuple(ids[len(ids) - trail :]), _pad_id(tokenizer, config or {}))

    @classmethod
    def beside(cls, tokenizer: Tokenizer, path: Path) -> Framing:
        """The framing of a tokenizer.json at `path`, with the configuration files beside it."""
        return cls.of(tokenizer, read_config(path.parent))


def read_config(folder: Path) -> dict[str, object]:
    """special_tokens_map.json overlaid by tokenizer_config.json, from `folder` (empty when neither is there)."""
    config: dict[str, object] = {}
    for name in reversed(CONFIG_FILES):
        path = Path(folder) / name
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise BundleError(f"cannot read {path}: {exc}") from exc
            if isinstance(loaded, dict):
                config |= {k: v for k, v in loaded.items() if v is not None}
    return config


class RapTokenizer:
    """Wraps a Hugging Face fast tokenizer (`tokenizer.json` of any kind, framed by its post-processor).

    `special_tokens`: "text" reads `[SEP]`, `</s>`, ... inside a text as plain text
    (the safe default); "special" reads them as their special ids, as a Hugging Face
    classifier behind a sidecar does. The guard must read text as the classifier does.
    `framing`: the row's special tokens and pad id (default: from the tokenizer itself,
    see `Framing`; `from_file` also reads the configuration files beside tokenizer.json).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        rap_token_id: int | None,
        max_length: int,
        special_tokens: SpecialTokens = "text",
        framing: Framing | None = None,
        rap_position: RapPosition = "front",
    ) -> None:
        if special_tokens not in ("text", "special"):
            raise InputError(f"special_tokens must be 'text' or 'special', got {special_tokens!r}")
        if rap_position not in RAP_POSITIONS:
            raise InputError(f"rap_position must be one of {', '.join(RAP_POSITIONS)}, got {rap_position!r}")
        framing = framing or Framing.of(tokenizer)
        framed = len(framing.prefix) + len(framing.suffix)
        if max_length < framed + 2:
            raise InputError(f"max_length must be at least {framed + 2}, got {max_length}")
        self._tokenizer = _configured(tokenizer, special_tokens)
        self.rap_token_id = rap_token_id
        self.rap_position = rap_position
        self.max_length = max_length
        self.framing = framing
        self.framed = framed  # special tokens around the text in a pass-1 row
        self.text_window = max_length - framed - 1  # framing + RAP + text fills max_length in pass 2
        self.special_tokens = special_tokens
        self.pad_id = framing.pad_id
        self.cls_id = framing.prefix[0]  # the first special token
        self.sep_id = framing.suffix[-1] if framing.suffix else None
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(special | {*framing.prefix, *framing.suffix, framing.pad_id})

    @classmethod
    def from_file(
        cls,
        path: Path,
        rap_token_id: int | None,
        max_length: int,
        special_tokens: SpecialTokens = "text",
        rap_position: RapPosition = "front",
    ) -> RapTokenizer:
        """Read `path` (tokenizer.json) and the configuration files beside it (`Framing`)."""
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exception subclasses
            raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(tok, rap_token_id, max_length, special_tokens, Framing.beside(tok, Path(path)), rap_position)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special tokens ([CLS], [SEP], [PAD], <s>, ...), the framing and pad ids included."""
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def token_id(self, word: str) -> int | None:
        return self._tokenizer.token_to_id(word)

    def word_id(self, word: str) -> int | None:
        """The one token `word` is where it stands in a text after a space (None: it is several tokens).

        Byte-level BPE and SentencePiece spell a word after a space with a marker (`Ġword`,
        `▁word`) that `token_id` does not add; this reads it as the classifier would."""
        before = self._encode([WORD_CONTEXT])[0]
        after = self._encode([f"{WORD_CONTEXT} {word}"])[0]
        if after[: len(before)] != before or len(after) != len(before) + 1 or after[-1] in self._special_ids:
            return None  # several pieces, or [UNK]
        return after[-1]

    def rare_word(self, avoid: Sequence[str] = ()) -> tuple[str, int]:
        """A rare whole word of this vocabulary that is one token in a text: (word, id).

        Rare by the tokenizer's own order: byte-level BPE, SentencePiece and WordPiece
        vocabularies list their pieces from frequent to rare, so the highest ids are the
        rarest. Only plain lower-case words of 3 to 12 letters qualify, none in `avoid`."""
        vocab = self._tokenizer.get_vocab()
        for token, token_id in sorted(vocab.items(), key=lambda item: -item[1]):
            word = token.lstrip(WORD_MARKERS)
            if token_id in self._special_ids or not (3 <= len(word) <= 12 and word.isascii()):
                continue
            if word.isalpha() and word.islower() and word not in avoid and self.word_id(word) == token_id:
                return word, token_id
        raise InputError("this vocabulary has no single-token word of 3 to 12 letters; pass --init-word")

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id) or f"<id {token_id}>"

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Pass-1 inputs: `[CLS] text [SEP]` (the tokenizer's framing), the text cut to `text_window` tokens, padded."""
        return self.pad(self.ids(texts))

    def encode_perturbed(self, texts: Sequence[str]) -> EncodedBatch:
        """Pass-2 inputs: `[CLS] RAP text [SEP]` (or `[CLS] text RAP [SEP]`), the same text tokens as pass 1, padded."""
        return self.pad(self.perturbed_ids(texts))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded pass-1 token ids, one row per text (its first window)."""
        return [self._row(content) for content in self._content(texts, self.text_window)]

    def perturbed_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded pass-2 token ids: the RAP id at `rap_position`."""
        return self.perturb(self.ids(texts))

    def perturb(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Pass-2 rows from pass-1 rows: the same tokens with the RAP id at `rap_position`."""
        if self.rap_token_id is None:
            raise BundleError("this tokenizer has no RAP token id; it cannot build pass-2 inputs")
        return self.insert(rows, self.rap_token_id)

    def insert(self, rows: Sequence[Sequence[int]], token_id: int) -> list[list[int]]:
        """The same pass-1 rows with `token_id` where pass 2 puts the RAP id (the switch pass's too): right after
        the first special token ("front"), or right before the trailing special tokens ("end")."""
        return [[*row[:at], token_id, *row[at:]] for row in rows for at in (self.rap_index(row),)]

    def rap_index(self, row: Sequence[int]) -> int:
        """Where the inserted id lands in a pass-1 `row` (its index in the pass-2 row)."""
        return RAP_AFTER if self.rap_position == "front" else len(row) - len(self.framing.suffix)

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
            if not self.reads_a_token(content):
                raise InputError(f"text {i} is empty: it has no token the model reads")
            for start in window_starts(len(content), self.text_window):
                rows.append(self._row(content[start : start + self.text_window]))
                owner.append(i)
            lengths.append(len(content))
        return Windows(rows, owner, lengths)

    def reads_a_token(self, ids: Sequence[int]) -> bool:
        """Whether these ids hold a token the model reads (not a special one): a text without one is refused."""
        return any(t not in self._special_ids for t in ids)

    def reads(self, classifier_max_length: ClassifierWindow) -> int | None:
        """Text tokens a classifier of that window reads (None: all of them)."""
        if classifier_max_length == ALL_TOKENS:
            return None
        return self.text_window if classifier_max_length is None else max(classifier_max_length - self.framed, 1)

    def pad(self, rows: Sequence[Sequence[int]]) -> EncodedBatch:
        """Pad rows to the longest one; attention mask marks real tokens."""
        return _pad(rows, self.pad_id)

    def _row(self, content: Sequence[int]) -> list[int]:
        return [*self.framing.prefix, *content, *self.framing.suffix]

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


def _pad_id(tokenizer: Tokenizer, config: Mapping[str, object]) -> int:
    """tokenizer.json's padding id, else the id of the pad token its configuration files name."""
    padding = tokenizer.padding
    pad_token = padding.get("pad_token") if padding else None
    if pad_token and padding.get("pad_id") is not None and tokenizer.token_to_id(pad_token) == padding["pad_id"]:
        return int(padding["pad_id"])
    named = config.get("pad_token")
    token = named.get("content") if isinstance(named, dict) else named
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    if token_id is None:
        raise BundleError(
            "the tokenizer names no pad token (tokenizer.json padding, or pad_token in "
            "tokenizer_config.json / special_tokens_map.json beside it)"
        )
    return token_id


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> EncodedBatch:
    width = max((len(row) for row in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return EncodedBatch(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
