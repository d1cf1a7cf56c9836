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
    """Runs the classifier on an encoded batch and returns logits (batch, labels)."""

    name: str

    def infer(self, batch: EncodedBatch) -> np.ndarray: ...

    def close(self) -> None: ...


def load_backend(kind: str, bundle_dir: Path, threads: int | None = None) -> Backend:
    """Load `onnx` (serving default) or `torch` (debugging, parity) from a bundle."""
    if kind == "onnx":
        from guard.core.backends.onnx import OnnxBackend

        return OnnxBackend(bundle_dir / "model.onnx", threads=threads)
    if kind == "torch":
        from guard.core.backends.torch import TorchBackend

        return TorchBackend(bundle_dir / "hf", threads=threads)
    raise BackendError(f"unknown backend {kind!r}; choose 'onnx' or 'torch'")
