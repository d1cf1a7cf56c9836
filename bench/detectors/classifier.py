"""The suspect classifier as the baselines see it: texts in, probabilities out.

Runs the bundle's own ONNX graph (the one the guard serves), pass 1 only, and counts
forward passes so every detector's cost is measured the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from guard.core import rap
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle


class Classifier:
    def __init__(self, bundle_dir: Path, batch_size: int = 64) -> None:
        bundle = load_bundle(bundle_dir)
        self.tokenizer = bundle.tokenizer()
        self.backend = load_backend("onnx", bundle.path)
        self.batch_size = batch_size
        self.passes = 0  # rows run through the model so far

    def probs(self, texts: Sequence[str], progress: str | None = None) -> np.ndarray:
        """Softmax probabilities, batched by length (less padding), in the order given."""
        ids = self.tokenizer.ids(list(texts))
        order = np.argsort([len(row) for row in ids], kind="stable")
        out: list[np.ndarray] = [np.empty(0)] * len(ids)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
            chunk = order[start : start + self.batch_size]
            logits = self.backend.infer(self.tokenizer.pad([ids[i] for i in chunk]))
            for i, row in zip(chunk, rap.softmax(logits), strict=True):
                out[i] = row
        self.passes += len(ids)
        return np.stack(out) if out else np.empty((0, 0))

    def predict(self, texts: Sequence[str], progress: str | None = None) -> np.ndarray:
        return self.probs(texts, progress).argmax(axis=1)
