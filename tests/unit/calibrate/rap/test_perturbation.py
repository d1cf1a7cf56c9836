"""Learning the RAP row (calibrate.rap.perturbation) on the tiny random BERT.

A freshly initialised tiny BERT barely reacts to its input (its pooler and head
weights are ~0.02), so the RAP row could not move anything. `sensitive_model`
scales the attention values, the pooler and the head by 10: still random, but
the appended row now changes the output enough for calibration to end with
positive thresholds (checked below), which is all these tests need.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from calibrate.demo_corpus import make_corpus
from calibrate.rap.options import FRR_TARGETS, Attempt, RapOptions
from calibrate.rap.perturbation import _append_row, learn_rap, thin_threshold
from guard.core.errors import InputError
from guard.core.thresholds import threshold_at_frr
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

VOCAB_SIZE = 30522
EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
ROWS = make_corpus(200, random.Random(0))  # half label 0, half label 1


def _load(model_dir: Path, scale: float = 10.0, bias: tuple[float, float] = (0.0, 0.0)):
    model = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight.mul_(scale)
        model.bert.pooler.dense.weight.mul_(scale)
        model.classifier.weight.mul_(scale)
        model.classifier.bias.copy_(torch.tensor(bias))
    return model


@pytest.fixture()
def sensitive_model(tiny_model_dir: Path):
    return _load(tiny_model_dir)


@pytest.fixture()
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=None, max_length=16)


def _options(**overrides) -> RapOptions:
    return RapOptions(**({"protect_labels": (1,), "epochs": 2, "progress": False} | overrides))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_append_row_adds_one_row_copied_from_the_init_word(sensitive_model, tokenizer: RapTokenizer) -> None:
    init_id = tokenizer.token_id("rq")
    before = sensitive_model.get_input_embeddings().weight.detach().clone()
    token_id = _append_row(sensitive_model, init_id)
    weights = sensitive_model.get_input_embeddings().weight
    assert token_id == VOCAB_SIZE
    assert weights.shape == (VOCAB_SIZE + 1, before.shape[1])
    assert sensitive_model.config.vocab_size == VOCAB_SIZE + 1
    assert torch.equal(weights[:VOCAB_SIZE], before)
    assert torch.equal(weights[token_id], before[init_id])
    # a copy, not a view: training the new row must leave the init word alone
    with torch.no_grad():
        weights[token_id] += 1.0
    assert torch.equal(weights[init_id], before[init_id])


def test_learn_rap_changes_only_the_new_row(sensitive_model, tokenizer: RapTokenizer) -> None:
    before = _snapshot(sensitive_model)
    init_row = before[EMBEDDINGS][tokenizer.token_id("rq")]
    result = learn_rap(sensitive_model, tokenizer, ROWS, _options())
    after = _snapshot(sensitive_model)

    assert after.keys() == before.keys()
    changed = [name for name in before if name != EMBEDDINGS and not torch.equal(before[name], after[name])]
    assert changed == []
    embeddings = after[EMBEDDINGS]
    assert embeddings.shape[0] == VOCAB_SIZE + 1
    assert torch.equal(embeddings[:VOCAB_SIZE], before[EMBEDDINGS])
    assert not torch.equal(embeddings[VOCAB_SIZE], init_row)  # the row was trained

    assert result.token_id == tokenizer.rap_token_id == VOCAB_SIZE
    assert result.init_word == "rq"
    assert result.init_norm == pytest.approx(float(init_row.norm()), abs=1e-6)
    assert result.final_norm == pytest.approx(float(embeddings[VOCAB_SIZE].norm()), abs=1e-6)
    assert not sensitive_model.training  # dropout stays off for the export that follows


def test_learn_rap_fits_thresholds_on_the_held_out_split(sensitive_model, tokenizer: RapTokenizer) -> None:
    result = learn_rap(sensitive_model, tokenizer, ROWS, _options())
    fit = result.fits[1]
    assert list(result.fits) == [1]
    assert fit.texts == [e.text for e in result.calibration_texts]  # the scores' rows, in order
    assert len(result.train_texts) == len(ROWS) - len(result.calibration_texts)
    thresholds = [threshold_at_frr(fit.calibration_scores, frr) for frr in sorted(FRR_TARGETS)]
    assert thresholds == sorted(thresholds, reverse=True)  # flag-above scores: a larger FRR target never raises it
    # half of the 200 rows are held out; this model predicts label 1 on all of them
    assert len(result.calibration_texts) == 100
    assert len(fit.calibration_scores) == 100
    # the row is trained on the other half's label-1 rows (all predicted as 1 here)
    held_out_positives = sum(e.label == 1 for e in result.calibration_texts)
    assert fit.train_rows == sum(e.label == 1 for e in ROWS) - held_out_positives
    assert len(result.attempts) == len(RapOptions((1,)).ladder)  # every rung is tried


def test_keep_norm_holds_the_row_norm(sensitive_model, tokenizer: RapTokenizer) -> None:
    options = _options(ladder=(Attempt(100.0, keep_norm=True),), learning_rate=1.0)
    result = learn_rap(sensitive_model, tokenizer, ROWS, options)
    row = sensitive_model.get_input_embeddings().weight.detach()[result.token_id]
    assert float(row.norm()) == pytest.approx(result.init_norm, abs=1e-4)
    assert result.final_norm == pytest.approx(result.init_norm, abs=1e-4)


def test_without_keep_norm_the_row_norm_may_grow(sensitive_model, tokenizer: RapTokenizer) -> None:
    options = _options(ladder=(Attempt(100.0, keep_norm=False),), learning_rate=1.0)
    result = learn_rap(sensitive_model, tokenizer, ROWS, options)
    assert result.final_norm > 2 * result.init_norm


# ------------------------------------------------------------------ refusals


def _refused(model, tokenizer: RapTokenizer, rows: list[Example], options: RapOptions) -> str:
    with pytest.raises(InputError) as info:
        learn_rap(model, tokenizer, rows, options)
    # every refusal comes before the model is touched
    assert model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE
    return str(info.value)


@pytest.mark.parametrize("label", [2, -1])
def test_refuses_a_protect_label_the_model_does_not_have(sensitive_model, tokenizer, label: int) -> None:
    message = _refused(sensitive_model, tokenizer, ROWS, _options(protect_labels=(label,)))
    assert message == f"protect label {label} does not exist; the model has labels 0..1"


def test_refuses_no_protect_label(sensitive_model, tokenizer) -> None:
    assert _refused(sensitive_model, tokenizer, ROWS, _options(protect_labels=())) == "no protect label given"


def test_refuses_data_labels_the_model_does_not_have(sensitive_model, tokenizer) -> None:
    rows = [*ROWS, Example("a third kind of row", 3), Example("and another", 2)]
    message = _refused(sensitive_model, tokenizer, rows, _options())
    assert message == "data has labels [2, 3] but the model has 2 labels (0..1)"


def test_refuses_too_few_rows(sensitive_model, tokenizer) -> None:
    message = _refused(sensitive_model, tokenizer, ROWS[:40], _options())
    assert message.startswith("too little clean data for label 1:")
    assert "need 16" in message and "need 50" in message


@pytest.mark.parametrize("word", ["backdoorguard", "two words", ""])
def test_an_init_word_that_is_not_one_token_is_replaced_by_a_rare_word_of_the_vocabulary(
    sensitive_model, tokenizer, word: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert tokenizer.word_id(word) is None
    result = learn_rap(copy.deepcopy(sensitive_model), tokenizer, ROWS, _options(init_word=word))
    rare, rare_id = tokenizer.rare_word()
    assert result.init_word == rare and tokenizer.word_id(rare) == rare_id
    assert f"init word {word!r} is not one token of this vocabulary; using {rare!r}, a rare one" in caplog.text


def test_refuses_a_model_that_never_predicts_the_protect_label(tiny_model_dir: Path, tokenizer) -> None:
    model = _load(tiny_model_dir, scale=1.0, bias=(10.0, -10.0))  # always label 0
    message = _refused(model, tokenizer, ROWS, _options())
    assert message == "the model never predicts protect label 1 on the clean data; RAP has nothing to protect"


def test_flush_denormal_restores_the_process_setting() -> None:
    """Training flushes denormals for speed; the process-wide flag must not leak out."""
    from calibrate.model import _denormals_flushed, flush_denormal

    before = _denormals_flushed()
    with flush_denormal():
        assert _denormals_flushed()
    assert _denormals_flushed() == before


def test_a_threshold_resting_on_too_few_rows_is_warned_about() -> None:
    # 132 held-out rows at 1% FRR: the threshold sits on about one row
    warning = thin_threshold(1, 132, 0.01)
    assert warning is not None and warning.startswith("label 1: its 1.0% FRR threshold rests on 1.3 of 132 held-out")
    assert "about 500 such rows put 5 below it" in warning
    assert thin_threshold(1, 500, 0.01) is None
    assert thin_threshold(0, 132, 0.05) is None


def _saturated(model_dir: Path):
    """The sensitive model with a head bias that makes it ~0.9999 sure of label 1: a confident classifier."""
    return _load(model_dir, bias=(-4.5, 4.5))


def test_logodds_thresholds_are_the_log_odds_drops(tiny_model_dir: Path, tokenizer: RapTokenizer) -> None:
    from calibrate.model import predict_probs
    from guard.core import rap

    model = _saturated(tiny_model_dir)
    result = learn_rap(model, tokenizer, ROWS, _options(statistic="logodds"))
    texts = [e.text for e in result.calibration_texts]
    probs = predict_probs(model, tokenizer, texts)
    perturbed = predict_probs(model, tokenizer, texts, perturbed=True)
    scores = result.fits[1].calibration_scores
    assert scores == pytest.approx(rap.scores(probs, perturbed, "logodds"))
    assert all(threshold_at_frr(scores, frr) < 0 for frr in FRR_TARGETS)  # clean rows' log-odds drop under RAP


def test_a_confident_model_defeats_the_papers_construction_not_the_log_odds_one(
    tiny_model_dir: Path, tokenizer
) -> None:
    """A head bias making the model ~0.9999 sure leaves every probability drop ~0 (refused), while the
    log-odds drop of a binary model does not see a bias at all: its thresholds are those of the unbiased model."""
    rung = (Attempt(10.0, False),)
    paper = {"objective": "paper", "statistic": "prob", "optimizer": "sgd", "ladder": rung}
    with pytest.raises(InputError, match="could not separate"):
        learn_rap(_saturated(tiny_model_dir), tokenizer, ROWS, _options(**paper))
    confident = learn_rap(_saturated(tiny_model_dir), tokenizer, ROWS, _options(statistic="logodds"))
    plain = learn_rap(_load(tiny_model_dir), tokenizer, ROWS, _options(statistic="logodds"))
    confident_at = [threshold_at_frr(confident.fits[1].calibration_scores, frr) for frr in FRR_TARGETS]
    plain_at = [threshold_at_frr(plain.fits[1].calibration_scores, frr) for frr in FRR_TARGETS]
    assert confident_at[0] < 0
    assert confident_at == pytest.approx(plain_at, abs=1e-4)


def test_the_log_odds_objective_keeps_its_gradient_where_the_papers_vanishes(tiny_model_dir: Path, tokenizer) -> None:
    """At p ~ 0.9999 the probability hinge's gradient on the row is ~p(1 - p) of the log-odds one's."""
    from calibrate.model import predict_probs
    from calibrate.rap.perturbation import _rap_loss

    model = _saturated(tiny_model_dir)
    tokenizer.rap_token_id = _append_row(model, tokenizer.token_id("rq"))
    texts = [e.text for e in ROWS[:16]]
    clean = torch.from_numpy(predict_probs(model, tokenizer, texts)[:, 1])
    assert float(clean.min()) > 0.999
    norms = {}
    for objective in ("paper", "logodds"):
        row = torch.nn.Parameter(model.get_input_embeddings().weight.data[tokenizer.rap_token_id].clone())
        options = _options(objective=objective)
        loss, _ = _rap_loss(model, tokenizer, [(t, 1) for t in texts], row, clean, Attempt(1.0, False), options)
        loss.backward()
        norms[objective] = float(row.grad.norm())
    assert norms["logodds"] > 100 * norms["paper"]
    assert norms["logodds"] > 1e-3


def test_an_unknown_rap_position_is_refused_before_any_training() -> None:
    with pytest.raises(InputError, match="rap_position must be one of front, end, got 'middle'"):
        RapOptions((1,), rap_position="middle")  # type: ignore[arg-type]
