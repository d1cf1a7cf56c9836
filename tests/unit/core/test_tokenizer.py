"""RapTokenizer with the real MiniLM WordPiece tokenizer (30,522 ids, [CLS]=101, [SEP]=102, [PAD]=0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guard.core.errors import BundleError, InputError
from guard.core.family import RAP_POSITIONS
from guard.core.tokenizer import RapTokenizer

RAP_ID = 30522
CLS, SEP, PAD = 101, 102, 0
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)


@pytest.fixture(scope="module", params=RAP_POSITIONS)
def tok(tokenizer_path: Path, request: pytest.FixtureRequest) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=64, rap_position=request.param)


def _with_rap(row: list[int], position: str) -> list[int]:
    """A pass-1 row [CLS] ... [SEP] with the RAP id where `position` puts it, written out by hand."""
    return [CLS, RAP_ID, *row[1:]] if position == "front" else [*row[:-1], RAP_ID, SEP]


def _rap_index(row: list[int], position: str) -> int:
    return 1 if position == "front" else len(row) - 2


def _rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [row[m == 1].tolist() for row, m in zip(ids, mask, strict=True)]


def test_special_ids_and_vocab(tok: RapTokenizer) -> None:
    assert (tok.cls_id, tok.pad_id, tok.vocab_size) == (CLS, PAD, RAP_ID)
    assert tok.token_id("hello") == 7592
    assert tok.token_id("no-such-token-here") is None


def test_pass1_is_cls_text_sep(tok: RapTokenizer) -> None:
    batch = tok.encode(["hello world"])
    assert batch.input_ids.tolist() == [[CLS, 7592, 2088, SEP]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1]]
    assert batch.token_type_ids.tolist() == [[0, 0, 0, 0]]
    assert {a.dtype for a in batch.as_feeds().values()} == {np.dtype(np.int64)}


def test_pass2_is_pass1_with_rap_id_after_cls_or_before_sep(tok: RapTokenizer) -> None:
    texts = ["hello world", "a", "The film was surprisingly good, wasn't it?", "café ünïcode 東京"]
    pass1 = tok.encode(texts)
    pass2 = tok.encode_perturbed(texts)
    for row1, row2 in zip(
        _rows(pass1.input_ids, pass1.attention_mask), _rows(pass2.input_ids, pass2.attention_mask), strict=True
    ):
        assert row2 == _with_rap(row1, tok.rap_position)
    assert pass2.input_ids.shape[1] == pass1.input_ids.shape[1] + 1


@pytest.mark.parametrize("position", RAP_POSITIONS)
def test_truncation_keeps_cls_rap_and_sep(tokenizer_path: Path, position: str) -> None:
    short = RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=8, rap_position=position)
    pass1 = short.encode([LONG_TEXT, "hi"])
    pass2 = short.encode_perturbed([LONG_TEXT, "hi"])
    assert pass1.input_ids.shape == (2, 7)
    assert pass2.input_ids.shape == (2, 8)
    long1, long2 = pass1.input_ids[0].tolist(), pass2.input_ids[0].tolist()
    assert long1[0] == CLS and long1[-1] == SEP
    assert long2[0] == CLS and long2[_rap_index(long2, position)] == RAP_ID and long2[-1] == SEP
    assert pass1.attention_mask[0].all() and pass2.attention_mask[0].all()


def test_both_passes_read_the_same_text_tokens_at_the_truncation_boundary(tok: RapTokenizer) -> None:
    """The bypass: a trigger as the last token pass 1 reads must be in pass 2 too."""
    words = LONG_TEXT.split()
    for cut in range(tok.text_window - 3, tok.text_window + 3):
        text = " ".join([*words[:cut], "mb"])
        (row1,), (row2,) = tok.ids([text]), tok.perturbed_ids([text])
        assert row2 == _with_rap(row1, tok.rap_position)
        assert row1[1:-1] == [t for t in row2[1:-1] if t != RAP_ID]


@pytest.mark.parametrize("max_length", [4, 5, 16])
def test_lengths_never_exceed_max_length(tokenizer_path: Path, max_length: int) -> None:
    t = RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=max_length)
    for encode in (t.encode, t.encode_perturbed):
        batch = encode([LONG_TEXT, "", "one two"])
        assert batch.input_ids.shape[1] <= max_length
        for row in _rows(batch.input_ids, batch.attention_mask):
            assert row[0] == CLS and row[-1] == SEP


def test_padding_and_attention_mask(tok: RapTokenizer) -> None:
    texts = ["hi", "a much longer sentence with quite a few more words in it"]
    for encode in (tok.encode, tok.encode_perturbed):
        batch = encode(texts)
        lengths = batch.attention_mask.sum(axis=1)
        assert lengths[0] < lengths[1] == batch.input_ids.shape[1]
        for row, mask, n in zip(batch.input_ids, batch.attention_mask, lengths, strict=True):
            assert mask.tolist() == [1] * n + [0] * (len(mask) - n)  # ones first, then padding
            assert (row[n:] == PAD).all()
            assert row[n - 1] == SEP


def test_pass1_can_never_emit_the_rap_id(tok: RapTokenizer) -> None:
    texts = [
        "[unused0]",
        "[PAD] [CLS] [SEP] [MASK] [UNK]",
        "rq cf mn bb mb",
        "30522 <rap> [RAP] [unused993]",
        "\x00\ufffd\U0001f600 " * 10,
        "x" * 5000,
        "",
    ]
    pass1 = tok.encode(texts)
    assert pass1.input_ids.max() < RAP_ID
    pass2 = tok.encode_perturbed(texts)
    assert ((pass2.input_ids == RAP_ID).sum(axis=1) == 1).all()
    for row in _rows(pass2.input_ids, pass2.attention_mask):
        assert row[_rap_index(row, tok.rap_position)] == RAP_ID


def test_an_unknown_rap_position_is_refused(tokenizer_path: Path) -> None:
    with pytest.raises(InputError, match="rap_position must be one of front, end"):
        RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=64, rap_position="middle")


@pytest.mark.parametrize("bad", ["a single string", ["ok", 3], [None], ["ok", b"bytes"]])
def test_bad_input_raises_input_error(tok: RapTokenizer, bad: object) -> None:
    with pytest.raises(InputError):
        tok.encode(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        tok.encode_perturbed(bad)  # type: ignore[arg-type]


def test_empty_batch(tok: RapTokenizer) -> None:
    for encode in (tok.encode, tok.encode_perturbed):
        batch = encode([])
        assert batch.input_ids.shape == batch.attention_mask.shape == batch.token_type_ids.shape == (0, 0)
        assert len(batch) == 0


def test_no_rap_id_means_no_pass2(tokenizer_path: Path) -> None:
    t = RapTokenizer.from_file(tokenizer_path, rap_token_id=None, max_length=16)
    assert t.encode(["fine"]).input_ids.shape == (1, 3)
    with pytest.raises(BundleError, match="no RAP token id"):
        t.encode_perturbed(["fine"])


def test_max_length_too_small(tokenizer_path: Path) -> None:
    with pytest.raises(InputError, match="max_length"):
        RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=3)


def test_unreadable_tokenizer_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(BundleError, match="cannot read tokenizer"):
        RapTokenizer.from_file(bad, rap_token_id=RAP_ID, max_length=16)
    with pytest.raises(BundleError, match="cannot read tokenizer"):
        RapTokenizer.from_file(tmp_path / "missing.json", rap_token_id=RAP_ID, max_length=16)


def test_at_the_end_the_rap_id_goes_before_the_frames_sep_not_one_typed_in_the_text(tokenizer_path: Path) -> None:
    """Read as special (a sidecar in front of a Hugging Face classifier), `[SEP]` typed in a text is the separator
    id inside the row; pass 2 must still insert before the framing's own last [SEP] and read every text token."""
    tok = RapTokenizer.from_file(tokenizer_path, RAP_ID, 64, special_tokens="special", rap_position="end")
    for text in ("good [SEP] mb", "mb [SEP]", "[SEP]mb[SEP]"):
        (row1,), (row2,) = tok.ids([text]), tok.perturbed_ids([text])
        assert row1.count(SEP) >= 2  # the typed separator is read as the special id
        assert row2 == [*row1[:-1], RAP_ID, SEP]
        assert [t for t in row2 if t != RAP_ID] == row1
