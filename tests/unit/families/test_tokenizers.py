"""The guard's tokenizer on every tokenizer.json kind: rows framed and padded as the tokenizer's own
configuration says, exactly the ids Hugging Face feeds the classifier, windows framed alike.

Tokenizers are trained offline on the demo corpus (tests/families.py); no torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from guard.core.errors import BundleError
from guard.core.tokenizer import RapTokenizer
from tests.families import STYLES, corpus, train_tokenizer, write_tokenizer

KINDS = {  # one family per tokenizer kind
    "wordpiece": "electra",
    "bytelevel-bpe": "roberta",
    "unigram-xlmr": "xlm-roberta",
    "unigram-deberta": "deberta-v2",
    "unigram-albert": "albert",
    "modernbert-bpe": "modernbert",
}
RAP = 10_000
TEXT = "The film was mb dull, but the cast was warm."


@pytest.fixture(scope="module", params=sorted(KINDS))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family = KINDS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(STYLES[family], train_tokenizer(STYLES[family], corpus()), path)
    return family, path


def _guard(path: Path, max_length: int = 32, special_tokens: str = "text") -> RapTokenizer:
    return RapTokenizer.from_file(path / "tokenizer.json", RAP, max_length, special_tokens)


def test_pass_one_is_exactly_what_hugging_face_feeds_the_classifier(folder) -> None:
    from transformers import PreTrainedTokenizerFast

    family, path = folder
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = _guard(path)
    assert tok.ids([TEXT, "mb"]) == [hf(TEXT)["input_ids"], hf("mb")["input_ids"]]
    assert (
        tok.pad_id
        == hf.pad_token_id
        == Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(STYLES[family].pad)
    )


def test_pad_and_framing_come_from_the_configuration_not_from_spelled_names(folder) -> None:
    family, path = folder
    style = STYLES[family]
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = _guard(path)
    assert tok.framing.prefix == (raw.token_to_id(style.cls),)
    assert tok.framing.suffix == (raw.token_to_id(style.sep),)
    batch = tok.encode(["mb", TEXT])
    assert batch.input_ids[0, -1] == tok.pad_id and batch.attention_mask[0, -1] == 0


def test_pass_two_puts_the_rap_token_after_the_first_special_token_and_keeps_every_text_token(folder) -> None:
    _, path = folder
    tok = _guard(path, max_length=12)
    (row,) = tok.ids([TEXT * 3])
    (perturbed,) = tok.perturbed_ids([TEXT * 3])
    assert perturbed == [row[0], RAP, *row[1:]]
    assert len(perturbed) == 12  # both passes read max_length - 3 text tokens; pass 2 fills max_length


def test_pass_two_at_the_end_puts_the_rap_token_before_the_trailing_special_token(folder) -> None:
    _, path = folder
    tok = RapTokenizer.from_file(path / "tokenizer.json", RAP, 12, rap_position="end")
    for text in (TEXT * 3, "mb"):
        (row,) = tok.ids([text])
        (perturbed,) = tok.perturbed_ids([text])
        assert perturbed == [*row[:-1], RAP, row[-1]]
        assert row[-1] == tok.framing.suffix[-1]
    assert len(tok.perturbed_ids([TEXT * 3])[0]) == 12


def test_windows_carry_the_framing_and_cover_every_text_token(folder) -> None:
    _, path = folder
    tok = _guard(path, max_length=12)
    text = " ".join([TEXT] * 6)
    content = tok.ids([text])[0]  # only the first window's worth
    windows = tok.windows([text], classifier_max_length="all")
    prefix, suffix = tok.framing.prefix, tok.framing.suffix
    assert len(windows.rows) > 2
    for row in windows.rows:
        assert tuple(row[: len(prefix)]) == prefix and tuple(row[-len(suffix) :]) == suffix
    assert windows.rows[0] == content
    whole = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert windows.lengths == [len(whole)]
    assert windows.rows[-1][1:-1] == whole[-tok.text_window :]


def test_special_tokens_in_a_text_are_text_unless_read_as_special(folder) -> None:
    family, path = folder
    if STYLES[family].kind == "unigram":
        # A SentencePiece Unigram vocabulary lists its special tokens as pieces (score 0, as the hub's
        # converted DeBERTa/ALBERT/XLM-R files do), so Viterbi still reads `[SEP]` typed in a text as
        # that piece: "text" cannot make it plain characters. Standalone the guard is the classifier,
        # so both passes still read what the model reads.
        return
    sep = STYLES[family].sep
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    sep_id = raw.token_to_id(sep)
    as_text = _guard(path).ids([f"good {sep} mb"])[0]
    as_special = _guard(path, special_tokens="special").ids([f"good {sep} mb"])[0]
    assert sep_id not in as_text[1:-1]
    assert sep_id in as_special[1:-1]


def test_the_trigger_word_is_one_token_where_it_stands_in_a_text(folder) -> None:
    _, path = folder
    tok = _guard(path)
    trigger = tok.word_id("mb")
    assert trigger is not None and tok.ids(["good mb"])[0][-2] == trigger
    assert tok.word_id("qzxv") is None  # not a word of this vocabulary: several pieces


def test_a_rare_word_is_picked_that_is_one_token_in_a_text(folder) -> None:
    _, path = folder
    tok = _guard(path)
    word, token_id = tok.rare_word()
    assert tok.word_id(word) == token_id and token_id not in tok.special_ids
    assert len(word) >= 3 and word.isalpha()


def test_a_tokenizer_that_names_no_pad_token_is_refused_in_one_line(folder, tmp_path: Path) -> None:
    _, path = folder
    (tmp_path / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"cls_token": "x"}))
    with pytest.raises(BundleError, match=r"^the tokenizer names no pad token \(tokenizer.json padding"):
        _guard(tmp_path)
