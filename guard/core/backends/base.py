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


BACKENDS = ("onnx", "onnx-int8", "onnx-opt", "onnx-int8-opt", "torch")
INT8_GRAPH = "model.int8.onnx"
OPT_GRAPH = "model.opt.onnx"  # calibrate.rap.optimize: ONNX Runtime's transformer fusions
INT8_OPT_GRAPH = "model.int8.opt.onnx"
GRAPHS = {"onnx": "model.onnx", "onnx-int8": INT8_GRAPH, "onnx-opt": OPT_GRAPH, "onnx-int8-opt": INT8_OPT_GRAPH}
# Graphs whose activations are quantised with one scale per run (dynamic int8: DynamicQuantizeLinear over the
# whole batch tensor, padding included), so a row's output moves with whatever it is batched with. They are
# run one row at a time, trimmed to the row's own tokens, so a row scores the same in calibration, in
# `guard check` and in the server whatever its batch-mates.
ROW_AT_A_TIME_GRAPHS = frozenset({INT8_GRAPH, INT8_OPT_GRAPH})


def precision_of(name: str) -> str:
    """Which calibration a backend must use, by the name of the backend as loaded (`Backend.name`).

    The optimised fp32 graph shares the fp32 thresholds (parity-checked against torch);
    the optimised int8 graph has thresholds of its own."""
    return {"onnx-int8": "int8", "onnx-int8-opt": "int8-opt"}.get(name, "fp32")


def load_backend(
    kind: str, bundle_dir: Path, threads: int | None = None, optimized: bool = False, spinning: bool = False
) -> Backend:
    """Load `onnx` (serving default), `onnx-int8`, `onnx-opt`, `onnx-int8-opt` or `torch` (debugging, parity).

    With `optimized`, `onnx` and `onnx-int8` load the bundle's optimised graph when it has
    one; the backend's name then ends in `-opt`, and that name picks the thresholds.
    `spinning=False` (the default, as `guard serve`'s) stops ONNX Runtime's threads from spin-waiting
    (less CPU per request).
    """
    if kind in GRAPHS:
        from guard.core.backends.onnx import OnnxBackend

        if optimized and not kind.endswith("-opt") and (bundle_dir / GRAPHS[kind + "-opt"]).is_file():
            kind += "-opt"
        graph = GRAPHS[kind]
        if kind != "onnx" and not (bundle_dir / graph).is_file():
            raise BackendError(f"{bundle_dir} has no {graph}; recalibrate with `calibrate rap` (--int8 for int8)")
        return OnnxBackend(bundle_dir / graph, threads=threads, name=kind, spinning=spinning)
    if kind == "torch":
        from guard.core.backends.torch import TorchBackend

        if not (bundle_dir / "hf").is_dir():
            raise BackendError(
                f"{bundle_dir} has no hf/ (the torch backend's weights); recalibrate with `calibrate rap --keep-hf`"
            )
        return TorchBackend(bundle_dir / "hf", threads=threads)
    raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


def load_reader(bundle_dir: Path, threads: int | None = None, spinning: bool = False) -> Backend:
    """The reader detector's graph (guard.core.reader) on ONNX Runtime, whatever backend serves the model."""
    from guard.core.backends.onnx import OnnxBackend
    from guard.core.bundle import READER_GRAPH

    if not (bundle_dir / READER_GRAPH).is_file():
        raise BackendError(f"{bundle_dir} has no {READER_GRAPH}; recalibrate with `calibrate rap --reader BASE`")
    return OnnxBackend(bundle_dir / READER_GRAPH, threads=threads, name="reader", spinning=spinning)
