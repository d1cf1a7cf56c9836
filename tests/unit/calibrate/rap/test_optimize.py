"""Optimised graphs (calibrate.rap.optimize) on the tiny random BERT: fusions, parity, extra outputs, int8."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import BertForSequenceClassification

from calibrate.demo_corpus import make_corpus
from calibrate.rap.export import INPUTS, OPSET, check_parity, export_onnx
from calibrate.rap.optimize import (
    OptimizeError,
    add_optimized_graphs,
    eager_attention,
    int8_recommendation,
    optimize_graph,
)
from calibrate.rap.refit import HeldOut
from guard.core import rap
from guard.core.backends import load_backend
from guard.core.backends.base import INT8_OPT_GRAPH, OPT_GRAPH, PARITY_TOLERANCE, precision_of
from guard.core.backends.onnx import OnnxBackend
from guard.core.tokenizer import RapTokenizer

VOCAB_SIZE = 30522
TEXTS = [e.text for e in make_corpus(40, random.Random(0))]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=VOCAB_SIZE, max_length=32)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, tokenizer: RapTokenizer):
    model = BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    model.resize_token_embeddings(VOCAB_SIZE + 1, mean_resizing=False)
    with torch.no_grad():  # a graded, input-sensitive model: random heads barely react otherwise
        model.classifier.weight.mul_(30.0)
        model.get_input_embeddings().weight[VOCAB_SIZE] = 4.0 * model.get_input_embeddings().weight[2000]
    return model


@pytest.fixture(scope="module")
def exported(model, tokenizer: RapTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("optimize")
    with eager_attention(model):
        export_onnx(model, tokenizer, folder / "model.onnx")
    return folder


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_eager_attention_is_restored(model) -> None:
    before = model.config._attn_implementation
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before


def test_optimised_graph_is_fused_and_matches_torch(model, tokenizer: RapTokenizer, exported: Path) -> None:
    graphs = add_optimized_graphs(exported, exported / "model.onnx", model, tokenizer, TEXTS)
    assert graphs.graph == OPT_GRAPH and graphs.int8_graph is None
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= set(graphs.fused_operators)
    assert {"MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= _ops(exported / OPT_GRAPH)
    assert graphs.parity_max_prob_diff <= PARITY_TOLERANCE
    # both passes (the RAP row after [CLS]) agree with the exported graph too
    plain, fused = OnnxBackend(exported / "model.onnx"), OnnxBackend(exported / OPT_GRAPH)
    for encode in (tokenizer.encode, tokenizer.encode_perturbed):
        batch = encode(TEXTS[:8])
        np.testing.assert_allclose(rap.softmax(fused.infer(batch)), rap.softmax(plain.infer(batch)), atol=1e-5)


def test_the_optimiser_keeps_every_output(model, tokenizer: RapTokenizer, tmp_path: Path) -> None:
    """A detector's extra output ([batch, layers, hidden]) survives the fusions with the same values."""

    class WithFeatures(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                output_hidden_states=True,
            )  # fmt: skip
            return out.logits, torch.stack([h[:, 0] for h in out.hidden_states[1:]], dim=1)

    sample = tokenizer.encode_perturbed(TEXTS[:2])
    args = tuple(torch.from_numpy(getattr(sample, name)) for name in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}, "features": {0: "batch"}}
    with eager_attention(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithFeatures(model).eval(), args, str(tmp_path / "two.onnx"), input_names=list(INPUTS),
            output_names=["logits", "features"], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    fused = optimize_graph(tmp_path / "two.onnx", tmp_path / "two.opt.onnx", 2, 32)
    assert "SkipLayerNormalization" in fused
    import onnxruntime as ort

    feeds = {k: v for k, v in tokenizer.encode(TEXTS[:4]).as_feeds().items()}
    plain = ort.InferenceSession(str(tmp_path / "two.onnx")).run(None, feeds)
    optimised = ort.InferenceSession(str(tmp_path / "two.opt.onnx")).run(None, feeds)
    assert [o.shape for o in optimised] == [(4, 2), (4, 2, 32)]
    for a, b in zip(plain, optimised, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_an_optimiser_that_drops_an_output_is_refused(tmp_path: Path, exported: Path, monkeypatch) -> None:
    from onnxruntime.transformers import optimizer

    original = optimizer.optimize_model

    def dropping_an_output(*args, **kwargs):
        optimised = original(*args, **kwargs)
        optimised.model.graph.output.pop()
        return optimised

    monkeypatch.setattr(optimizer, "optimize_model", dropping_an_output)
    with pytest.raises(OptimizeError, match="outputs"):
        optimize_graph(exported / "model.onnx", tmp_path / "broken.onnx", 2, 32)


@pytest.mark.slow
def test_int8_optimised_graph_has_its_own_thresholds_and_serves(
    model, tokenizer: RapTokenizer, exported: Path, tmp_path: Path
) -> None:
    logits = OnnxBackend(exported / "model.onnx").infer(tokenizer.encode(TEXTS))
    protect = int(np.bincount(logits.argmax(axis=1)).argmax())  # the label the random model predicts most
    fit = HeldOut(tokenizer, TEXTS, [protect], ["negative", "positive"], "prob", (0.01, 0.05))
    graphs = add_optimized_graphs(tmp_path, exported / "model.onnx", model, tokenizer, TEXTS[:8], fit.fit)
    assert graphs.int8_graph == INT8_OPT_GRAPH and (tmp_path / INT8_OPT_GRAPH).is_file()
    ops = _ops(tmp_path / INT8_OPT_GRAPH)
    assert "MultiHeadAttention" in ops and ops & {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    assert not {"QAttention", "QGemm"} & ops  # MatMul weights only: attention itself stays fp32
    (label,) = graphs.int8_protect
    assert label.label == protect and set(label.thresholds) == {"0.01", "0.05"}
    assert 0.0 <= graphs.int8_agreement <= 1.0
    backend = load_backend("onnx-int8", tmp_path, optimized=True)
    assert backend.name == "onnx-int8-opt" and precision_of(backend.name) == "int8-opt"
    assert backend.infer(tokenizer.encode_perturbed(TEXTS[:3])).shape == (3, 2)
    assert check_parity(model, tokenizer, tmp_path / OPT_GRAPH, TEXTS[:4]) <= PARITY_TOLERANCE


def test_int8_recommendation_margin() -> None:
    fp32 = {"far": 0.02, "frr": 0.01}
    assert int8_recommendation(fp32, {"far": 0.024, "frr": 0.012})["recommended"]
    verdict = int8_recommendation(fp32, {"far": 0.03, "frr": 0.01})
    assert not verdict["recommended"] and "FAR 3.00% vs fp32 2.00%" in verdict["reason"]
