"""Export the calibrated model to ONNX and prove it matches torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from calibrate.model import head_features, model_family
from guard.core import rap
from guard.core.backends.base import PARITY_TOLERANCE
from guard.core.backends.onnx import OnnxBackend
from guard.core.errors import GuardError
from guard.core.features import FEATURES_OUTPUT
from guard.core.tokenizer import RapTokenizer

log = logging.getLogger(__name__)

OPSET = 17
FEATURE_PARITY_TOLERANCE = 1e-3  # max |f_onnx - f_torch| / max |f_torch|
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # a family without token types has the first two only


class ParityError(GuardError):
    """The exported graph disagrees with the torch model beyond PARITY_TOLERANCE."""


def graph_inputs(model: PreTrainedModel) -> tuple[str, ...]:
    """The exported graph's inputs: `token_type_ids` only where the family takes token types."""
    return INPUTS if model_family(model).takes_token_types(model.config.to_dict()) else INPUTS[:2]


class _LogitsAndFeatures(torch.nn.Module):
    """logits, and per encoder layer the hidden state the head reads (the feature detector's input)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **types)
        return out.logits, head_features(self.model, out.hidden_states, attention_mask)


def export_onnx(model: PreTrainedModel, tokenizer: RapTokenizer, path: Path, perturbed: bool = True) -> None:
    """Write one graph with dynamic batch and sequence axes (pass 1 and pass 2 share it).

    Outputs: `logits`, and `features` (guard.core.features), which ONNX Runtime
    computes only when a caller asks for it. `perturbed=False` traces on plain rows (a
    model without the RAP row: the reader detector's)."""
    wrapped = _LogitsAndFeatures(model).eval()
    inputs = graph_inputs(model)
    encode = tokenizer.encode_perturbed if perturbed else tokenizer.encode
    sample = encode(["a short sample", "a somewhat longer sample sentence"])
    args = tuple(torch.from_numpy(getattr(sample, name)) for name in inputs)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs} | {
        "logits": {0: "batch"},
        FEATURES_OUTPUT: {0: "batch"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The legacy (TorchScript) exporter handles dynamic axes without onnxscript.
        torch.onnx.export(
            wrapped,
            args,
            str(path),
            input_names=list(inputs),
            output_names=["logits", FEATURES_OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    model.eval()  # the legacy exporter restores train mode (dropout on) after tracing


def check_parity(model: PreTrainedModel, tokenizer: RapTokenizer, onnx_path: Path, texts: list[str]) -> float:
    """Max |p_onnx - p_torch| over pass-1 and pass-2 inputs; raise if above tolerance.

    The `features` output must match torch's [CLS] vectors too (relative to their scale)."""
    backend = OnnxBackend(onnx_path)
    worst, worst_features = 0.0, 0.0
    for perturbed in (False, True):
        encode = tokenizer.encode_perturbed if perturbed else tokenizer.encode
        for i in range(0, len(texts), 32):
            batch = encode(texts[i : i + 32])
            torch_logits, torch_features = _torch_outputs(model, batch)
            logits, features = backend.infer_with_features(batch)
            worst = max(worst, float(np.abs(rap.softmax(torch_logits) - rap.softmax(logits)).max()))
            scale = float(np.abs(torch_features).max()) or 1.0
            worst_features = max(worst_features, float(np.abs(torch_features - features).max()) / scale)
    backend.close()
    if worst > PARITY_TOLERANCE:
        raise ParityError(
            f"ONNX export disagrees with torch: max probability difference {worst:.2e} > {PARITY_TOLERANCE:g}"
        )
    if worst_features > FEATURE_PARITY_TOLERANCE:
        raise ParityError(
            f"ONNX features disagree with torch: max relative difference {worst_features:.2e} > "
            f"{FEATURE_PARITY_TOLERANCE:g}"
        )
    log.info("ONNX parity: max probability difference %.2e, features %.2e", worst, worst_features)
    return worst


@torch.inference_mode()
def _torch_outputs(model: PreTrainedModel, batch) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    out = _LogitsAndFeatures(model)(*(torch.from_numpy(getattr(batch, name)) for name in graph_inputs(model)))
    return out[0].double().numpy(), out[1].double().numpy()


INT8_RECIPE = "dynamic int8, MatMul weights only, per-channel (onnxruntime.quantization)"


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 on MatMul weights only, per channel.

    Quantizing every op (the default) flipped 66 of 1,821 SST-2 predictions and
    raised FAR to 8.6% in our measurements; MatMul-only per-channel kept accuracy.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantizer logs one INFO line per tensor on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8
            )
    finally:
        root.setLevel(level)
