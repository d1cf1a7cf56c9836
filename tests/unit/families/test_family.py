"""guard.core.family: what each encoder family's config says about how it reads its input."""

from __future__ import annotations

import pytest

from guard.core.errors import InputError
from guard.core.family import DBS, FAMILIES, MEFT, PURE, family_of, support_matrix


@pytest.mark.parametrize(
    ("model_type", "name", "token_types"),
    [
        ("bert", "BERT", True),
        ("roberta", "RoBERTa", False),
        ("xlm-roberta", "XLM-R", False),
        ("deberta-v2", "DeBERTa-v2/v3", False),
        ("modernbert", "ModernBERT", False),
        ("electra", "ELECTRA", True),
        ("albert", "ALBERT", True),
        ("distilbert", "DistilBERT", False),
    ],
)
def test_each_family_is_found_by_its_model_type(model_type: str, name: str, token_types: bool) -> None:
    family = family_of({"model_type": model_type})
    assert (family.name, family.takes_token_types({"model_type": model_type})) == (name, token_types)


def test_an_unknown_model_type_names_the_supported_families() -> None:
    with pytest.raises(InputError, match=r"model type 'gpt2' is not supported; supported families: BERT, RoBERTa"):
        family_of({"model_type": "gpt2"})


def test_deberta_takes_token_types_only_when_it_has_their_embeddings() -> None:
    family = family_of({"model_type": "deberta-v2"})
    assert not family.takes_token_types({"type_vocab_size": 0})
    assert family.takes_token_types({"type_vocab_size": 2})


def test_roberta_positions_start_after_the_padding_index() -> None:
    roberta = family_of({"model_type": "roberta"})
    assert roberta.max_tokens({"max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert family_of({"model_type": "bert"}).max_tokens({"max_position_embeddings": 512}) == 512
    assert roberta.max_tokens({}) is None


def test_modernbert_features_follow_its_head_pooling() -> None:
    modern = family_of({"model_type": "modernbert"})
    assert modern.pooling({"classifier_pooling": "mean"}) == "mean"
    assert modern.pooling({"classifier_pooling": "cls"}) == "first"
    assert family_of({"model_type": "roberta"}).pooling({"classifier_pooling": "mean"}) == "first"


def test_word_embeddings_live_where_each_checkpoint_names_them() -> None:
    assert family_of({"model_type": "modernbert"}).embeddings == "embeddings.tok_embeddings.weight"
    assert family_of({"model_type": "albert"}).embeddings == "embeddings.word_embeddings.weight"


def test_a_family_without_optimiser_fusions_says_why() -> None:
    for family in FAMILIES:
        assert (family.optimizer is None) == bool(family.optimizer_skipped), family.name
    assert family_of({"model_type": "roberta"}).optimizer == "bert"


def test_an_unsupported_repair_is_refused_in_one_line_naming_what_supports_it() -> None:
    albert = family_of({"model_type": "albert"})
    line = albert.refusal(PURE)
    assert line == "PURE supports BERT, RoBERTa, XLM-R, ELECTRA; this model is ALBERT"
    assert albert.refusal(MEFT) is None and albert.refusal(DBS) is None
    assert family_of({"model_type": "roberta"}).refusal(PURE) is None


def test_the_support_matrix_has_a_line_per_family() -> None:
    lines = support_matrix().splitlines()
    assert len(lines) == len(FAMILIES)
    assert "  DistilBERT: MEFT, DBS scan/unlearn/harden" in lines


def test_calibrate_help_lists_what_each_family_supports(capsys) -> None:
    from calibrate import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for family in FAMILIES:
        (line,) = [line for line in out.splitlines() if line.strip().startswith(f"{family.name}:")]
        assert ("PURE" in line) == (PURE in family.repairs), line
