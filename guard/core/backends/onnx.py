"""ONNX Runtime backend: the serving default (no torch needed)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort

from guard.core.backends.base import ROW_AT_A_TIME_GRAPHS
from guard.core.errors import BackendError
from guard.core.features import FEATURES_OUTPUT
from guard.core.types import EncodedBatch


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then the CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        _load_cuda_libraries()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@functools.cache
def _load_cuda_libraries() -> None:
    # onnxruntime-gpu does not look for the CUDA and cuDNN libraries that NVIDIA's pip
    # wheels install (the GPU image uses them instead of a CUDA base image) unless asked
    # to preload them; without this the CUDA provider fails to load and sessions fall
    # back to the CPU. With system-wide CUDA it loads those; older builds lack the call.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, threads: int | None = None, name: str = "onnx", spinning: bool = True) -> None:
        self.name = name
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            # Worker threads otherwise spin-wait between operators and runs: lower latency on idle,
            # dedicated cores, but about twice the CPU per request measured on 2 shared cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers())
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"cannot load ONNX model {path}: {exc}") from exc
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.row_at_a_time = path.name in ROW_AT_A_TIME_GRAPHS
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "logits" not in outputs:
            raise BackendError(f"{path} has no 'logits' output; was it exported by calibrate?")
        features = outputs.get(FEATURES_OUTPUT)
        # (layers, hidden) of the feature output; None for graphs exported before it existed
        self.features_shape = tuple(features.shape[1:]) if features is not None else None

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        (logits,) = self._run(["logits"], batch)
        return np.asarray(logits, dtype=np.float32)

    def infer_with_features(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """logits and the `features` output (rows, layers, hidden) of one run."""
        if self.features_shape is None:
            raise BackendError("this graph has no features output; rebuild the bundle with `calibrate rap`")
        logits, features = self._run(["logits", FEATURES_OUTPUT], batch)
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def _run(self, outputs: list[str], batch: EncodedBatch) -> list[np.ndarray]:
        if self._session is None:
            raise BackendError("ONNX backend is closed")
        feeds = {k: v for k, v in batch.as_feeds().items() if k in self._inputs}
        if not self.row_at_a_time:
            return self._call(outputs, feeds)
        per_row = [self._call(outputs, _one_row(feeds, batch.attention_mask[i], i)) for i in range(len(batch))]
        return [np.concatenate(parts) for parts in zip(*per_row, strict=True)]

    def _call(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(outputs, feeds)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed: {exc}") from exc

    def close(self) -> None:
        self._session = None


def _one_row(feeds: dict[str, np.ndarray], mask: np.ndarray, row: int) -> dict[str, np.ndarray]:
    """Row `row` of `feeds` alone, without the right padding its batch gave it (every output of these graphs
    is per row: logits and [CLS] features, no sequence axis)."""
    length = int(mask.sum())
    keep = length if length and mask[:length].all() else mask.shape[0]  # not right-padded: keep it whole
    return {name: value[row : row + 1, :keep] for name, value in feeds.items()}
