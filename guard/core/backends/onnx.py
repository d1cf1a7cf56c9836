"""ONNX Runtime backend: the serving default (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from guard.core.errors import BackendError
from guard.core.types import EncodedBatch


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, threads: int | None = None, name: str = "onnx") -> None:
        self.name = name
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"cannot load ONNX model {path}: {exc}") from exc
        self._inputs = {i.name for i in self._session.get_inputs()}
        if "logits" not in {o.name for o in self._session.get_outputs()}:
            raise BackendError(f"{path} has no 'logits' output; was it exported by calibrate?")

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        if self._session is None:
            raise BackendError("ONNX backend is closed")
        feeds = {k: v for k, v in batch.as_feeds().items() if k in self._inputs}
        try:
            (logits,) = self._session.run(["logits"], feeds)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed: {exc}") from exc
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self._session = None
