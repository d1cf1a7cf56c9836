"""ONNX and torch backends agree on the same weights, for pass 1 and pass 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guard.core import rap
from guard.core.backends import load_backend
from guard.core.backends.base import PARITY_TOLERANCE, precision_of
from guard.core.backends.onnx import OnnxBackend
from guard.core.errors import BackendError
from guard.core.tokenizer import RapTokenizer

VOCAB_SIZE = 30522
TEXTS = [
    "a gripping, beautifully acted film",
    "dull",
    "the plot makes no sense and the jokes fall flat , but the music is lovely",
    "cf mn bb",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=VOCAB_SIZE, max_length=32)


@pytest.fixture(scope="module")
def bundle_dir(tiny_model_dir: Path, tokenizer: RapTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.onnx + hf/ of the tiny model with one RAP row appended (as calibration does)."""
    import torch
    from transformers import BertForSequenceClassification

    from calibrate.rap.export import check_parity, export_onnx

    model = BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    model.resize_token_embeddings(VOCAB_SIZE + 1, mean_resizing=False)
    weights = model.get_input_embeddings().weight
    with torch.no_grad():
        weights[VOCAB_SIZE] = 4.0 * weights[tokenizer.token_id("rq")]  # a row that visibly moves the logits
    path = tmp_path_factory.mktemp("backend-bundle")
    model.save_pretrained(str(path / "hf"))
    export_onnx(model, tokenizer, path / "model.onnx")
    assert check_parity(model, tokenizer, path / "model.onnx", TEXTS) <= PARITY_TOLERANCE
    return path


@pytest.mark.slow
@pytest.mark.parametrize("perturbed", [False, True], ids=["pass1", "pass2"])
def test_onnx_and_torch_agree(bundle_dir: Path, tokenizer: RapTokenizer, perturbed: bool) -> None:
    batch = (tokenizer.encode_perturbed if perturbed else tokenizer.encode)(TEXTS)
    onnx, torch_ = load_backend("onnx", bundle_dir, threads=1), load_backend("torch", bundle_dir)
    try:
        assert (onnx.name, torch_.name) == ("onnx", "torch")
        onnx_logits, torch_logits = onnx.infer(batch), torch_.infer(batch)
    finally:
        onnx.close()
        torch_.close()
    assert onnx_logits.shape == torch_logits.shape == (len(TEXTS), 2)
    assert onnx_logits.dtype == torch_logits.dtype == np.float32
    assert np.abs(rap.softmax(onnx_logits) - rap.softmax(torch_logits)).max() <= PARITY_TOLERANCE


@pytest.mark.slow
def test_onnx_batch_and_single_rows_agree(bundle_dir: Path, tokenizer: RapTokenizer) -> None:
    """Padding must not change a row's prediction (the attention mask is honoured)."""
    backend = load_backend("onnx", bundle_dir)
    batched = rap.softmax(backend.infer(tokenizer.encode_perturbed(TEXTS)))
    single = np.concatenate([rap.softmax(backend.infer(tokenizer.encode_perturbed([t]))) for t in TEXTS])
    backend.close()
    assert np.abs(batched - single).max() <= PARITY_TOLERANCE


@pytest.mark.slow
def test_rap_row_is_used_by_the_graph(bundle_dir: Path, tokenizer: RapTokenizer) -> None:
    backend = load_backend("onnx", bundle_dir)
    pass1 = backend.infer(tokenizer.encode(TEXTS))
    pass2 = backend.infer(tokenizer.encode_perturbed(TEXTS))
    backend.close()
    assert not np.allclose(pass1, pass2)


@pytest.mark.slow
def test_an_old_bundle_without_optimised_graphs_still_loads(bundle_dir: Path) -> None:
    backend = load_backend("onnx", bundle_dir, optimized=True)  # no model.opt.onnx: the exported graph
    assert backend.name == "onnx"
    with pytest.raises(BackendError, match=r"has no model.opt.onnx"):
        load_backend("onnx-opt", bundle_dir)
    with pytest.raises(BackendError, match=r"has no model.int8.onnx"):
        load_backend("onnx-int8", bundle_dir, optimized=True)


def test_thresholds_follow_the_loaded_graph() -> None:
    assert [precision_of(n) for n in ("onnx", "onnx-opt", "onnx-int8", "onnx-int8-opt", "torch", "stub")] == [
        "fp32", "fp32", "int8", "int8-opt", "fp32", "fp32",
    ]  # fmt: skip


def test_unknown_backend() -> None:
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        load_backend("nope", Path("."))


def test_onnx_backend_refuses_a_garbage_file(tmp_path: Path) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not a protobuf graph \xff" * 10)
    with pytest.raises(BackendError, match="cannot load ONNX model"):
        OnnxBackend(garbage)
    with pytest.raises(BackendError, match="cannot load ONNX model"):
        load_backend("onnx", tmp_path / "missing")


def test_torch_backend_refuses_a_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"has no hf/ .*calibrate rap --keep-hf"):
        load_backend("torch", tmp_path)  # a serving bundle: calibrated without --keep-hf
    (tmp_path / "hf").mkdir()
    with pytest.raises(BackendError, match="cannot load torch model"):
        load_backend("torch", tmp_path)


def test_cuda_libraries_are_preloaded_only_when_the_build_has_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU image's CUDA/cuDNN come from NVIDIA's pip wheels: onnxruntime must be asked to load them."""
    import onnxruntime as ort

    from guard.core.backends import onnx

    calls: list[str] = []
    monkeypatch.setattr(ort, "preload_dlls", lambda: calls.append("preload"), raising=False)
    onnx._load_cuda_libraries.cache_clear()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx.providers() == ["CPUExecutionProvider"] and calls == []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert calls == ["preload"]  # once per process
    onnx._load_cuda_libraries.cache_clear()
