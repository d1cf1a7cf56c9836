"""Tokenising only what the windows use (issue 28): prefixes that grow, and never a cut by characters.

The guard reads the first tokens of a text from a prefix of it; these tests hold the rows
to those of the whole text, tokenised untruncated, on texts built to fool a cut.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from guard.core.tokenizer import ALL_TOKENS, FIRST_PREFIX_CHARS_PER_TOKEN, PREFIX_MARGIN_TOKENS, RapTokenizer

RAP_ID = 30522
TRIGGER_ID = 16914  # "mb"
MAX_LENGTH = 32  # the guard reads 29 text tokens
FIRST_PREFIX = FIRST_PREFIX_CHARS_PER_TOKEN * (MAX_LENGTH - 3 + PREFIX_MARGIN_TOKENS)


class Recording:
    """The tokenizers.Tokenizer, recording the characters it is given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.chars = 0

    def encode_batch(self, texts: list[str], **kwargs):
        self.chars += sum(len(t) for t in texts)
        return self._tokenizer.encode_batch(texts, **kwargs)


@pytest.fixture()
def tok(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, RAP_ID, MAX_LENGTH, special_tokens="special")


def _whole(tok: RapTokenizer, texts: list[str]) -> list[list[int]]:
    """The text tokens of each whole text, tokenised at once (what a classifier reads)."""
    return [list(e.ids) for e in tok._tokenizer.encode_batch(texts, add_special_tokens=False)]


def _adversarial() -> list[str]:
    cut = FIRST_PREFIX
    return [
        "\u200b" * 10_000 + " good mb movie",  # zero-width characters yield no token
        "\u0301" * 5_000 + " good mb movie",  # combining marks the normaliser strips
        "\x00\x07" * 3_000 + " good mb movie",  # control characters
        "\u00ad" * 4_000 + "good mb movie",  # soft hyphens
        # the 29th token read is cut: a word WordPiece reads as one [UNK] (over 100 characters), a special token
        "good " * 28 + "\u200b" * (cut - 200) + "x" * 150 + " mb",
        "a " * 28 + "\u200b" * (cut - 59) + "[SEP] mb movie",
        "好" * 2 + "我们今天去公园玩了很久" * 300 + " mb",
        "ab" * 20_000 + " mb",  # one [UNK] of 40,000 characters
    ]


def test_rows_match_the_whole_texts_tokens(tok: RapTokenizer) -> None:
    texts = _adversarial()
    whole = _whole(tok, texts)
    assert tok.ids(texts) == [[tok.cls_id, *ids[: tok.text_window], tok.sep_id] for ids in whole]
    for reads in (64, 200):
        windows = tok.windows(texts, reads + 2)
        assert windows.lengths == [min(len(ids), reads) for ids in whole]
        for row, owner in zip(windows.rows, windows.owner, strict=True):
            content = row[1:-1]
            assert any(content == whole[owner][i : i + len(content)] for i in range(reads)), owner


def test_a_trigger_after_ten_thousand_zero_width_characters_is_read(tok: RapTokenizer) -> None:
    (row,) = tok.ids(["\u200b" * 10_000 + " good mb movie"])
    assert TRIGGER_ID in row


def test_a_long_text_is_tokenised_only_as_far_as_the_window_reads(tok: RapTokenizer) -> None:
    """Megabytes were tokenised (truncation off) to use the guard's 29 tokens."""
    recording = Recording(tok._tokenizer)
    tok._tokenizer = recording
    text = "the quick brown fox jumps over the lazy dog " * 400  # 17,600 characters
    windows = tok.windows([text] * 64)
    assert windows.lengths == [tok.text_window] * 64
    assert recording.chars == 64 * FIRST_PREFIX
    recording.chars = 0
    tok.windows([text], ALL_TOKENS)  # a sidecar's default reads it all
    assert recording.chars == len(text)


def test_each_round_tokenises_what_it_announced(tok: RapTokenizer) -> None:
    """What admission counts before a round is the work the round does."""
    recording = Recording(tok._tokenizer)
    tok._tokenizer = recording
    texts = _adversarial()
    for window in (None, 512, ALL_TOKENS):
        reading, total, done = tok.reading(texts, window), 0, False
        while not done:
            announced, recording.chars = reading.round_chars, 0
            done = reading.read_round()
            assert recording.chars == announced
            total += announced
        assert total < 3 * sum(map(len, texts))
        assert reading.windows() == tok.windows(texts, window)
