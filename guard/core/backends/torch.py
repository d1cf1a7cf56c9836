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
        config = self._model.config
        self.features_shape = (config.num_hidden_layers, config.hidden_size)

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        return self._forward(batch, hidden=False)[0]

    def infer_with_features(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """logits and the [CLS] vector of every encoder layer (rows, layers, hidden)."""
        return self._forward(batch, hidden=True)

    def _forward(self, batch: EncodedBatch, hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        feeds = {k: torch.from_numpy(v) for k, v in batch.as_feeds().items()}
        with torch.inference_mode():
            out = self._model(**feeds, output_hidden_states=hidden)
        features = torch.stack([h[:, 0, :] for h in out.hidden_states[1:]], 1).float().numpy() if hidden else None
        return out.logits.float().numpy(), features

    def close(self) -> None:
        self._model = None
