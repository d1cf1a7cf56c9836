"""PyTorch backend over the bundle's HF model dir (needs the [calibrate] extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.core.errors import BackendError, GuardError
from guard.core.family import family_of
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
        try:
            family = family_of(config.to_dict())
        except GuardError as exc:
            raise BackendError(f"cannot serve the model in {model_dir}: {exc}") from exc
        self._token_types = family.takes_token_types(config.to_dict())
        self._mean_pooled = family.pooling(config.to_dict()) == "mean"

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        return self._forward(batch, hidden=False)[0]

    def infer_with_features(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """logits and, per encoder layer, the hidden state the family's head reads (rows, layers, hidden)."""
        return self._forward(batch, hidden=True)

    def _forward(self, batch: EncodedBatch, hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        feeds = {k: torch.from_numpy(v) for k, v in batch.as_feeds().items()}
        if not self._token_types:  # DistilBERT, ModernBERT, RoBERTa...: as the exported graph, no token types
            feeds.pop("token_type_ids", None)
        with torch.inference_mode():
            out = self._model(**feeds, output_hidden_states=hidden)
        features = self._features(out.hidden_states, feeds["attention_mask"]) if hidden else None
        return out.logits.float().numpy(), features

    def _features(self, hidden_states, attention_mask) -> np.ndarray:
        torch = self._torch
        if not self._mean_pooled:
            return torch.stack([h[:, 0, :] for h in hidden_states[1:]], 1).float().numpy()
        mask = attention_mask.unsqueeze(-1).to(hidden_states[0].dtype)
        return torch.stack([(h * mask).sum(1) / mask.sum(1) for h in hidden_states[1:]], 1).float().numpy()

    def close(self) -> None:
        self._model = None
