"""PURE (calibrate.repair.pure): head scores, the greedy search, head removal, the attention penalty.

The math is checked on hand-made attention tensors with exact expected values; the
model-facing parts run on the tiny random BERT of tests/conftest.py (2 layers x 2 heads).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

from calibrate.demo_corpus import make_corpus
from calibrate.model import to_torch
from calibrate.options import TrainOptions
from calibrate.rap.export import check_parity, export_onnx
from calibrate.rap.perturbation import _append_row
from calibrate.repair.heads import (
    CONFIG_KEY,
    SearchStep,
    _attentions,
    cls_attention_variance,
    greedy_prune,
    head_variances,
    pruning_order,
    remove_heads,
    removed_heads,
)
from calibrate.repair.options import PruneOptions
from calibrate.repair.pure import attention_norm_penalty, layer_coefficients, penalty_weights, pure_repair
from calibrate.train import train_classifier
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

ROWS = make_corpus(96, random.Random(0))
FAST = TrainOptions(epochs=1, learning_rate=1e-3, batch_size=16, max_length=24, progress=False)
QUICK = PruneOptions(finetune=replace(FAST, learning_rate=1e-4), progress=False)


@pytest.fixture()
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=None, max_length=24)


@pytest.fixture()
def model(tiny_model_dir: Path):
    return BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()


# ---------------------------------------------------------------- eq. 2: variance scores


def _padded_variance(cls_attention: torch.Tensor) -> torch.Tensor:
    """What a public implementation computes: eq. 2 over every position, padding included."""
    return cls_attention.var(dim=-1, unbiased=True)


def test_variance_is_eq_2_over_real_tokens() -> None:
    attention = torch.tensor([[[0.5, 0.25, 0.25, 0.0, 0.0]]])  # 3 real tokens, 2 padding
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    expected = ((0.5 - 1 / 3) ** 2 + 2 * (0.25 - 1 / 3) ** 2) / 2
    assert cls_attention_variance(attention, mask).item() == pytest.approx(expected)


def test_variance_ignores_padding_where_counting_it_would_change_the_ranking() -> None:
    # Head A: all attention on one token of the short text, uniform on the long one.
    # Head B: uniform on the short text, all attention on one token of the long one.
    short = [[1.0, 0.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0]]  # (heads A, B) x 6 positions, 2 real
    long = [[1 / 6] * 6, [1.0, 0, 0, 0, 0, 0]]
    attention = torch.tensor([short, long])
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    ours = cls_attention_variance(attention, mask).mean(dim=0)
    padded = _padded_variance(attention).mean(dim=0)
    assert ours.tolist() == pytest.approx([0.25, 1 / 12])  # (0.5 + 0) / 2 and (0 + 1/6) / 2
    assert ours[0] > ours[1]  # B would be pruned first ...
    assert padded[0] < padded[1]  # ... but counting padding would prune A first


def test_head_variances_do_not_depend_on_how_texts_are_batched(model, tokenizer: RapTokenizer) -> None:
    short, long = "good", "a long and winding sentence about a film that was neither good nor bad at all"
    together = head_variances(model, tokenizer, [short, long])  # short is padded to long's length
    alone = (head_variances(model, tokenizer, [short]) + head_variances(model, tokenizer, [long])) / 2
    assert together.shape == (2, 2)
    np.testing.assert_allclose(together, alone, rtol=1e-5)


# ---------------------------------------------------------------- the greedy search


def test_pruning_order_is_ascending_and_keeps_each_layers_top_head() -> None:
    variances = np.array([[0.3, 0.1, 0.2], [0.05, 0.4, 0.01]])
    assert pruning_order(variances) == [(1, 2), (1, 0), (0, 1), (0, 2)]


def test_pruning_order_skips_removed_heads_and_keeps_a_survivor() -> None:
    variances = np.array([[0.3, 0.1, 0.2], [0.05, 0.4, 0.01]])
    # layer 0 lost its top head earlier: of heads 1 and 2, head 2 now stays
    assert pruning_order(variances, exclude={(0, 0), (1, 2)}) == [(1, 0), (0, 1)]


def _accuracy_falling_by(per_head: float, baseline: float = 0.9):
    calls = []

    def accuracy_without(heads) -> float:
        calls.append(list(heads))
        return baseline - per_head * len(heads)

    return accuracy_without, calls


def test_greedy_prune_stops_below_the_relative_threshold() -> None:
    order = [(0, i) for i in range(10)]
    accuracy_without, calls = _accuracy_falling_by(0.02)
    chosen, steps = greedy_prune(order, accuracy_without, threshold=0.9 - 0.05)
    # 0.88, 0.86 stay at or above 0.85; 0.84 does not: two heads go
    assert chosen == order[:2]
    assert [s.pruned for s in steps] == [1, 2, 3]
    assert steps[-1].accuracy == pytest.approx(0.84)
    assert calls == [order[:1], order[:2], order[:3]]  # nested prefixes of the order


@pytest.mark.parametrize(
    ("per_head", "per_step", "expected_pruned", "checks"),
    [
        (0.0, 1, 5, [1, 2, 3, 4, 5]),  # accuracy never drops: every candidate goes
        (0.1, 1, 0, [1]),  # the first head already costs too much: none goes
        (0.012, 2, 4, [2, 4, 5]),  # steps of two; 0.9 - 5 * 0.012 = 0.84 < 0.85
    ],
)
def test_greedy_prune_edges(per_head: float, per_step: int, expected_pruned: int, checks: list[int]) -> None:
    order = [(0, i) for i in range(5)]
    accuracy_without, _ = _accuracy_falling_by(per_head)
    chosen, steps = greedy_prune(order, accuracy_without, threshold=0.85, heads_per_step=per_step)
    assert chosen == order[:expected_pruned]
    assert [s.pruned for s in steps] == checks


# ---------------------------------------------------------------- removing heads


def test_removing_a_head_equals_dropping_its_output(model, tokenizer: RapTokenizer) -> None:
    """Zeroed parameters compute exactly what a structurally pruned head would: no contribution."""
    inputs = to_torch(tokenizer.encode(["a fine film", "not good at all"]))
    attention = model.bert.encoder.layer[1].attention.self
    size = attention.attention_head_size

    def drop_head_0(_module, _args, output):
        context = output[0].clone()
        context[..., :size] = 0.0
        return (context, *output[1:])

    handle = attention.register_forward_hook(drop_head_0)
    with torch.no_grad():
        expected = model(**inputs).logits
    handle.remove()
    remove_heads(model, [(1, 0)])
    with torch.no_grad():
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert removed_heads(model) == {(1, 0)}


def test_removed_heads_accumulate_in_the_config(model) -> None:
    remove_heads(model, [(1, 0)])
    remove_heads(model, [(0, 1)])
    assert getattr(model.config, CONFIG_KEY) == {"0": [1], "1": [0]}


def test_a_model_without_bert_layout_is_refused(tmp_path: Path) -> None:
    config = DistilBertConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    with pytest.raises(InputError, match="PURE needs a BERT-layout encoder .* distilbert model is not one"):
        remove_heads(DistilBertForSequenceClassification(config), [(0, 0)])


class _Silent:
    """A model whose outputs carry no attention weights (what sdpa attention returns)."""

    config = SimpleNamespace(model_type="mystery")

    def __call__(self, **inputs):
        return SimpleNamespace(attentions=())


def test_a_model_returning_no_attention_weights_is_refused() -> None:
    with pytest.raises(InputError, match="the mystery model returned no attention weights"):
        _attentions(_Silent(), {})


# ---------------------------------------------------------------- eq. 3: attention normalisation


def test_layer_coefficients_are_minus_log2_of_kept_means_min_max_normalised() -> None:
    variances = np.array([[2.0**-4, 2.0**-4], [2.0**-8, 1.0], [2.0**-6, 2.0**-6]])
    # layer 1 without its removed head 1: mean 2^-8; raw lambdas 4, 8, 6
    assert layer_coefficients(variances, removed={(1, 1)}).tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_layer_coefficients_are_all_one_when_layers_are_alike() -> None:
    assert layer_coefficients(np.full((3, 2), 0.01), removed=set()).tolist() == [1.0, 1.0, 1.0]


def test_penalty_weights_zero_removed_heads() -> None:
    weights = penalty_weights(np.array([0.5, 1.0]), {(0, 1)}, (2, 2))
    assert weights.tolist() == [[0.5, 0.0], [1.0, 1.0]]


def _uniform_cls_attention(n_real: int, seq: int, heads: int = 2) -> torch.Tensor:
    row = torch.zeros(seq)
    row[:n_real] = 1.0 / n_real
    attention = torch.zeros(1, heads, seq, seq)
    attention[:, :, 0, :] = row
    return attention


def test_penalty_reaches_its_minimum_at_uniform_attention() -> None:
    n_real, seq = 4, 7
    mask = torch.tensor([[1] * n_real + [0] * (seq - n_real)])
    weights = torch.tensor([[1.0, 1.0], [0.5, 0.0]])
    uniform = [_uniform_cls_attention(n_real, seq) for _ in range(2)]
    minimum = attention_norm_penalty(uniform, mask, weights)
    assert minimum.item() == pytest.approx(2.5 / math.sqrt(n_real))  # 1/sqrt(n) per weighted head
    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.randn(1, 2, seq, seq) + torch.where(mask.bool(), 0.0, -1e9)[:, None, None, :]
        focused = [torch.softmax(scores, dim=-1), torch.softmax(scores * 3, dim=-1)]
        assert attention_norm_penalty(focused, mask, weights) > minimum


# ---------------------------------------------------------------- end to end on the tiny model


@pytest.fixture(scope="module")
def repaired(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pure") / "model"
    options = PruneOptions(max_accuracy_drop=0.5, finetune=QUICK.finetune, mu=1.0, progress=False)
    return pure_repair(tiny_model_dir, ROWS[:64], ROWS[64:], out, options)


def test_pure_repair_removes_all_but_the_top_head_of_each_layer(repaired) -> None:
    # a floor 50 points under a random model's accuracy is never reached: every candidate goes,
    # which with 2 heads per layer is the lower-scoring head of each layer
    lowest = {layer: [int(np.argmin(scores))] for layer, scores in enumerate(repaired.variances)}
    assert repaired.pruned_heads == lowest
    assert repaired.search == [SearchStep(1, repaired.search[0].accuracy), SearchStep(2, repaired.search[1].accuracy)]
    assert repaired.pruned_accuracy == repaired.search[-1].accuracy
    assert repaired.accuracy_threshold == pytest.approx(repaired.baseline_accuracy - 0.5)
    assert set(repaired.seconds) == {"variance", "search", "finetune", "total"}


def test_removed_heads_stay_zero_through_fine_tuning_and_reload(repaired) -> None:
    model = BertForSequenceClassification.from_pretrained(str(repaired.out_dir))
    assert removed_heads(model) == {(layer, h) for layer, heads in repaired.pruned_heads.items() for h in heads}
    for layer, heads in repaired.pruned_heads.items():
        attention = model.bert.encoder.layer[layer].attention
        size = attention.self.attention_head_size
        for head in heads:
            rows = slice(head * size, (head + 1) * size)
            assert not attention.self.query.weight[rows].any() and not attention.self.value.bias[rows].any()
            assert not attention.output.dense.weight[:, rows].any()


def test_pure_repair_writes_a_record(repaired) -> None:
    record = json.loads((repaired.out_dir / "repair.json").read_text())
    assert record["method"] == "pure"
    assert record["pruned_count"] == 2 and record["head_count"] == 4
    assert record["options"]["mu"] == 1.0
    assert len(record["search"]) == 2 and len(record["layer_coefficients"]) == 2


def test_pruned_model_exports_to_onnx_with_parity(repaired, tmp_path: Path) -> None:
    model = BertForSequenceClassification.from_pretrained(str(repaired.out_dir)).eval()
    tokenizer = RapTokenizer.from_file(repaired.out_dir / "tokenizer.json", rap_token_id=None, max_length=24)
    tokenizer.rap_token_id = _append_row(model, tokenizer.token_id("rq"))
    export_onnx(model, tokenizer, tmp_path / "model.onnx")
    assert check_parity(model, tokenizer, tmp_path / "model.onnx", [r.text for r in ROWS[:16]]) <= 1e-4


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a few seconds of training: its [CLS] attention has learned to focus."""
    out = tmp_path_factory.mktemp("trained") / "model"
    train_classifier(tiny_model_dir, ROWS, out, replace(FAST, epochs=3))
    return out


def test_attention_normalisation_flattens_the_kept_heads(trained: Path, tokenizer, tmp_path: Path) -> None:
    texts = [r.text for r in ROWS[64:]]

    def weighted_focus(mu: float) -> float:
        """sum over kept heads of lambda_l * variance score, after PURE with this mu."""
        options = PruneOptions(max_accuracy_drop=0.0, mu=mu, finetune=replace(FAST, epochs=2), progress=False)
        result = pure_repair(trained, ROWS[:64], ROWS[64:], tmp_path / f"mu-{mu}", options)
        removed = {(layer, head) for layer, heads in result.pruned_heads.items() for head in heads}
        weights = penalty_weights(np.array(result.layer_coefficients), removed, result.variances.shape)
        model = BertForSequenceClassification.from_pretrained(str(result.out_dir))
        return float((weights.numpy() * head_variances(model, tokenizer, texts)).sum())

    assert weighted_focus(5.0) < 0.5 * weighted_focus(0.0)


def test_pure_repair_refuses_labels_the_model_does_not_have(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [*ROWS[:40], Example("a third kind of row", 2)]
    with pytest.raises(InputError, match=r"data has labels \[2\] but the model has 2 labels"):
        pure_repair(tiny_model_dir, rows, ROWS[64:], tmp_path / "out", QUICK)
    assert not (tmp_path / "out" / "config.json").exists()


def test_pure_repair_never_writes_over_its_input(tiny_model_dir: Path) -> None:
    with pytest.raises(InputError, match="is the input model"):
        pure_repair(tiny_model_dir, ROWS[:64], ROWS[64:], tiny_model_dir, QUICK, force=True)
