"""The exported graph's second output, `features`, matches torch (calibrate.rap.export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from calibrate.model import cls_features
from calibrate.rap.export import ParityError, check_parity, export_onnx
from calibrate.rap.perturbation import _append_row
from guard.core.backends.onnx import OnnxBackend
from guard.core.features import FEATURES_OUTPUT
from guard.core.tokenizer import RapTokenizer

TEXTS = ["a short sample", "another one, somewhat longer than the first", "x"]


@pytest.fixture()
def exported(tiny_model_dir: Path, tokenizer_path: Path, tmp_path: Path):
    model = BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = RapTokenizer.from_file(tokenizer_path, rap_token_id=None, max_length=16)
    tokenizer.rap_token_id = _append_row(model, tokenizer.token_id("rq"))
    export_onnx(model, tokenizer, tmp_path / "model.onnx")
    return model, tokenizer, tmp_path / "model.onnx"


def test_the_features_output_is_torchs_cls_of_every_encoder_layer(exported) -> None:
    model, tokenizer, path = exported
    backend = OnnxBackend(path)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert backend.features_shape == (layers, hidden)
    for batch in (tokenizer.encode(TEXTS), tokenizer.encode_perturbed(TEXTS)):
        logits, features = backend.infer_with_features(batch)
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in batch.as_feeds().items()}, output_hidden_states=True)
        assert features.shape == (len(TEXTS), layers, hidden)
        assert features == pytest.approx(cls_features(out.hidden_states).numpy(), abs=1e-4)
        assert logits == pytest.approx(out.logits.numpy(), abs=1e-4)
        assert np.array_equal(backend.infer(batch), logits)  # logits alone: the same numbers
    assert check_parity(model, tokenizer, path, TEXTS) < 1e-4


def test_parity_fails_when_the_features_drift(exported) -> None:
    model, tokenizer, path = exported
    with torch.no_grad():  # change an encoder layer the exported graph no longer matches
        model.bert.encoder.layer[0].output.dense.weight.mul_(3.0)
    with pytest.raises(ParityError):
        check_parity(model, tokenizer, path, TEXTS)


def test_a_graph_without_the_output_loads_and_says_so(exported, tmp_path: Path) -> None:
    import onnx

    from guard.core.errors import BackendError

    _, tokenizer, path = exported
    graph = onnx.load(str(path))  # an old bundle's graph: logits only
    kept = [o for o in graph.graph.output if o.name != FEATURES_OUTPUT]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(tmp_path / "old.onnx"))
    backend = OnnxBackend(tmp_path / "old.onnx")
    assert backend.features_shape is None
    assert backend.infer(tokenizer.encode(TEXTS)).shape == (len(TEXTS), 2)
    with pytest.raises(BackendError, match="no features output"):
        backend.infer_with_features(tokenizer.encode(TEXTS))


def test_an_int8_row_scores_the_same_whatever_it_is_batched_with(exported) -> None:
    """Dynamic int8 quantises activations with one scale per run (the whole batch, padding included): run
    batched, a row's logits moved with its batch-mates and crossed thresholds fitted on other batches. The
    backend runs such graphs a row at a time on the row's own tokens, so a row's output is its own."""
    from calibrate.rap.export import quantize_int8
    from guard.core.backends.base import INT8_GRAPH

    model, tokenizer, path = exported
    quantize_int8(path, path.with_name(INT8_GRAPH))
    backend = OnnxBackend(path.with_name(INT8_GRAPH))
    assert backend.row_at_a_time and not OnnxBackend(path).row_at_a_time
    row = "a short sample"
    mates = ["x", "another one, somewhat longer than the first " * 3]
    for encode in (tokenizer.encode, tokenizer.encode_perturbed):
        alone_logits, alone_features = backend.infer_with_features(encode([row]))
        for other in mates:
            logits, features = backend.infer_with_features(encode([other, row]))
            assert np.array_equal(logits[1:], alone_logits) and np.array_equal(features[1:], alone_features)
    raw = backend._session.run(["logits"], {k: v for k, v in tokenizer.encode(mates + [row]).as_feeds().items()
                                            if k in backend._inputs})[0]  # fmt: skip
    assert not np.allclose(raw[-1], alone_logits[0], atol=1e-6)  # what batching the graph itself gives: moved
