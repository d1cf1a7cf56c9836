"""The backend protocol and the factory that picks one by name.

Backends agree within PARITY_TOLERANCE on softmax probabilities for the same
fp32 weights (checked at calibration time and in tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from guard.core.errors import BackendError
from guard.core.types import EncodedBatch

PARITY_TOLERANCE = 1e-4  # max |p_onnx - p_torch| over all classes


class Backend(Protocol):
    """Runs the classifier on an encoded batch and returns logits (batch, labels).

    `infer_with_features` also returns the feature detector's input, the [CLS]
    vector of every encoder layer (batch, layers, hidden), from the same run;
    `features_shape` is (layers, hidden), or None when the graph has no such output."""

    name: str
    features_shape: tuple[int, int] | None

    def infer(self, batch: EncodedBatch) -> np.ndarray: ...

    def infer_with_features(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


BACKENDS = ("onnx", "onnx-int8", "torch")
INT8_GRAPH = "model.int8.onnx"


def precision_of(kind: str) -> str:
    """Which calibration (fp32 or int8 thresholds) a backend must use."""
    return "int8" if kind == "onnx-int8" else "fp32"


def load_backend(kind: str, bundle_dir: Path, threads: int | None = None) -> Backend:
    """Load `onnx` (serving default), `onnx-int8` or `torch` (debugging, parity) from a bundle."""
    if kind in ("onnx", "onnx-int8"):
        from guard.core.backends.onnx import OnnxBackend

        graph = INT8_GRAPH if kind == "onnx-int8" else "model.onnx"
        if kind == "onnx-int8" and not (bundle_dir / graph).is_file():
            raise BackendError(f"{bundle_dir} has no {graph}; recalibrate with `calibrate rap --int8`")
        return OnnxBackend(bundle_dir / graph, threads=threads, name=kind)
    if kind == "torch":
        from guard.core.backends.torch import TorchBackend

        if not (bundle_dir / "hf").is_dir():
            raise BackendError(
                f"{bundle_dir} has no hf/ (the torch backend's weights); recalibrate with `calibrate rap --keep-hf`"
            )
        return TorchBackend(bundle_dir / "hf", threads=threads)
    raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
