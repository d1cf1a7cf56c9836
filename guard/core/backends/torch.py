"""PyTorch backend over the bundle's HF model dir (needs the [calibrate] extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.core.errors import BackendError
from guard.core.types import EncodedBatch


class TorchBackend:
    name = "torch"

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification
        except ImportError as exc:
            raise BackendError(
                "the torch backend needs torch and transformers: pip install 'backdoor-guard[calibrate]'"
            ) from exc
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        try:
            self._model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load torch model from {model_dir}: {exc}") from exc

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        torch = self._torch
        feeds = {k: torch.from_numpy(v) for k, v in batch.as_feeds().items()}
        with torch.inference_mode():
            logits = self._model(**feeds).logits
        return logits.float().numpy()

    def close(self) -> None:
        self._model = None
