"""MEFT (calibrate.repair.meft): the entropy loss, the stop distance, the phases and the record.

The phases run on the tiny BERT of tests/conftest.py after a few seconds of training
(`trained`), so that its [CLS] representations separate the two labels and the
maximum-entropy phase has a distance to close.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from calibrate.demo_corpus import make_corpus
from calibrate.options import TrainOptions
from calibrate.repair.meft import (
    PLOT,
    cls_representations,
    entropy,
    max_entropy_loss,
    maxent_repair,
    maximise_entropy,
    simulate_head,
    stop_distance,
)
from calibrate.repair.options import MaxEntOptions
from calibrate.train import train_classifier
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

ROWS = make_corpus(96, random.Random(0))
PROBE = ROWS[:48]
QUICK_TRAIN = TrainOptions(epochs=1, learning_rate=1e-3, batch_size=16, max_length=24, progress=False)


def _options(**overrides) -> MaxEntOptions:
    defaults = {
        "learning_rate": 1e-3,
        "batch_size": 16,
        "check_every": 1,
        "max_steps": 40,
        "head": QUICK_TRAIN,
        "finetune": QUICK_TRAIN,
        "progress": False,
    }
    return MaxEntOptions(**(defaults | overrides))


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "model"
    options = TrainOptions(epochs=3, learning_rate=1e-3, batch_size=16, max_length=24, progress=False)
    train_classifier(tiny_model_dir, ROWS, out, options)
    return out


@pytest.fixture()
def model(trained: Path):
    return BertForSequenceClassification.from_pretrained(str(trained)).eval()


@pytest.fixture()
def tokenizer(trained: Path) -> RapTokenizer:
    return RapTokenizer.from_file(trained / "tokenizer.json", rap_token_id=None, max_length=24)


def _initial_distance(model, tokenizer) -> float:
    reps = cls_representations(model, tokenizer, [r.text for r in PROBE])
    return stop_distance(reps, torch.tensor([r.label for r in PROBE]))


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _changed(before: list[torch.Tensor], params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("labels", [2, 3, 5])
def test_entropy_is_maximal_at_uniform_predictions(labels: int) -> None:
    uniform = torch.zeros(1, labels)
    assert entropy(uniform).item() == pytest.approx(math.log(labels))
    assert max_entropy_loss(uniform).item() == pytest.approx(-math.log(labels))
    torch.manual_seed(0)
    others = torch.randn(200, labels) * 2
    assert (entropy(others) < math.log(labels)).all()
    assert max_entropy_loss(others) > max_entropy_loss(uniform)


def test_max_entropy_loss_is_the_batch_mean() -> None:
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])  # entropies log 2 and ~0
    assert max_entropy_loss(logits).item() == pytest.approx(-math.log(2) / 2)


def test_uniform_predictions_are_a_stationary_point_of_the_loss() -> None:
    logits = torch.full((3, 4), 0.7, requires_grad=True)
    max_entropy_loss(logits).backward()
    assert logits.grad.abs().max().item() < 1e-7


# ---------------------------------------------------------------- the stop distance


def test_stop_distance_is_the_squared_distance_between_centroids() -> None:
    reps = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert stop_distance(reps, torch.tensor([0, 0, 1, 1])) == pytest.approx(5.0)  # (1,0) vs (0,2)


def test_stop_distance_takes_the_farthest_pair_of_labels() -> None:
    reps = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 10.0]])
    assert stop_distance(reps, torch.tensor([0, 1, 2])) == pytest.approx(101.0)


def test_stop_distance_needs_two_labels() -> None:
    with pytest.raises(InputError, match="at least two labels"):
        stop_distance(torch.zeros(3, 2), torch.tensor([1, 1, 1]))


# ---------------------------------------------------------------- the phases


def test_maximise_entropy_stops_once_the_distance_is_below_the_threshold(model, tokenizer) -> None:
    start = _initial_distance(model, tokenizer)
    threshold = 0.8 * start
    steps, curve = maximise_entropy(model, tokenizer, ROWS, PROBE, _options(stop_distance=threshold))
    assert curve[0] == (0, pytest.approx(start))
    assert 0 < steps < 40
    assert curve[-1] == (steps, pytest.approx(curve[-1][1]))
    assert curve[-1][1] < threshold
    assert all(d >= threshold for _, d in curve[:-1])
    assert [s for s, _ in curve] == list(range(steps + 1))  # measured after every step (check_every=1)


def test_maximise_entropy_spends_the_budget_when_the_threshold_is_out_of_reach(model, tokenizer) -> None:
    steps, curve = maximise_entropy(
        model, tokenizer, ROWS, PROBE, _options(stop_distance=1e-12, max_steps=7, check_every=3)
    )
    assert steps == 7
    assert [s for s, _ in curve] == [0, 3, 6, 7]  # every 3 steps, and at the end of the budget
    assert curve[-1][1] >= 1e-12


def test_maximise_entropy_does_nothing_below_the_threshold(model, tokenizer) -> None:
    before = _snapshot(model.parameters())
    steps, curve = maximise_entropy(model, tokenizer, ROWS, PROBE, _options(stop_distance=1e9))
    assert (steps, len(curve)) == (0, 1)
    assert not _changed(before, model.parameters())


def test_maximise_entropy_trains_the_encoder_not_the_head(model, tokenizer) -> None:
    head, encoder = list(model.classifier.parameters()), list(model.bert.parameters())
    head_before, encoder_before = _snapshot(head), _snapshot(encoder)
    maximise_entropy(model, tokenizer, ROWS, PROBE, _options(stop_distance=1e-12, max_steps=3))
    assert not _changed(head_before, head)
    assert _changed(encoder_before, encoder)
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone


def test_simulate_head_trains_a_fresh_head_on_the_frozen_encoder(model, tokenizer) -> None:
    head, encoder = list(model.classifier.parameters()), list(model.bert.parameters())
    head_before, encoder_before = _snapshot(head), _snapshot(encoder)
    simulate_head(model, tokenizer, ROWS, _options())
    assert _changed(head_before, head)
    assert not _changed(encoder_before, encoder)
    assert all(p.requires_grad for p in model.parameters())


def test_simulate_head_keeps_the_models_own_head_when_asked(model, tokenizer) -> None:
    before = _snapshot(model.parameters())
    simulate_head(model, tokenizer, ROWS, _options(fresh_head=False))
    assert not _changed(before, model.parameters())


# ---------------------------------------------------------------- end to end


def test_maxent_repair_writes_the_model_the_record_and_the_curve(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "repaired"
    result = maxent_repair(trained, ROWS, out, _options(stop_distance=1e-12, max_steps=4, check_every=2), dev=PROBE)
    assert (result.steps, result.reached) == (4, False)
    assert [s for s, _ in result.curve] == [0, 2, 4]
    assert set(result.dev_accuracy) == {"head", "maxent", "final"}
    assert set(result.seconds) == {"head", "maxent", "final", "total"}
    record = json.loads((out / "repair.json").read_text())
    assert record["method"] == "maxent"
    assert record["steps"] == 4 and record["reached_stop_distance"] is False
    assert [p["step"] for p in record["stop_distance_curve"]] == [0, 2, 4]
    assert (out / PLOT).stat().st_size > 0
    reloaded = BertForSequenceClassification.from_pretrained(str(out))
    assert reloaded.config.num_labels == 2


def test_maxent_repair_refuses_rows_of_a_single_label(trained: Path, tmp_path: Path) -> None:
    rows = [Example(f"row {i}", 1) for i in range(40)]
    with pytest.raises(InputError, match="need at least two labels to measure the stop distance"):
        maxent_repair(trained, rows, tmp_path / "out", _options())


def test_maxent_repair_refuses_labels_the_model_does_not_have(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"data has labels \[3\] but the model has 2 labels"):
        maxent_repair(trained, [*ROWS, Example("odd one", 3)], tmp_path / "out", _options())
