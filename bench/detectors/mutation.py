"""Model-mutation score (BDMMT, Wei et al. 2023): how far an input's label falls when the weights are jiggled.

BDMMT's observation: under random mutations of the model's weights, backdoor-triggered inputs keep their
label more often than clean ones (the trigger dominates the prediction); it counts label changes over
mutants made by several DeepMutation operators. Here one operator (Gaussian noise on the weights) and a
continuous score instead of a count: for a text x and a label y,

    score(x) = lo(x; W) - (1/K) sum_k lo(x; W + E_k),   lo = log p(y|x) - log(1 - p(y|x))

the fall of y's log-odds (guard.core.rap.log_odds, as the bench's other statistics) from the model to the
mean over its K mutants; positive when the label weakens. BDMMT expects triggered inputs to fall LESS, but
an adaptive attacker may train the backdoor to be fragile instead, so no tail is assumed: bench.adaptive
thresholds the score and its negative, each and together.

Mutant k adds E_k to the weight matrix of every nn.Linear outside the embeddings: the encoder layers' and the
head's (BERT's pooler dense included: it feeds only the classifier); embeddings, LayerNorms and biases are
left as they are. Each entry of E_k is drawn from N(0, (scale * std(W))^2), std over that matrix's own
entries, so every matrix moves by the same relative amount whatever its size or initialisation. The
defaults are a starting point, not tuned: scale = 0.1 (noise a tenth of each matrix's spread, meant to probe
the decision function without replacing it) and K = 8 mutants, so the mean's sampling noise is about a third
of one mutant's. Mutant k's noise comes from a generator seeded by (seed, k), so scores are reproducible.
One copy of the original matrices is kept; a mutant is applied in place and the originals copied back.

Cost: K + 1 forward passes per scored text, in torch (a signal the bench measures; the guard does not serve it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from guard.core import rap


def mutated_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrix of every nn.Linear outside the embeddings, by parameter name."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and "embeddings" not in name.split(".")
    }


class TorchClassifier:
    """One Hugging Face classifier (CPU, eval mode): a label's log-odds per text, batched by length."""

    def __init__(self, model_dir: Path, max_length: int = 64, batch_size: int = 64) -> None:
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def log_odds(self, texts: list[str], label: int) -> np.ndarray:
        """Per text: log p(label|x) - log(1 - p(label|x)) under the model (guard.core.rap.log_odds)."""
        return self._log_odds(self._batches(list(texts)), label, len(texts)) if texts else np.empty(0)

    def _batches(self, texts: list[str]) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """(row indices, encoded batch), rows sorted by length so a batch pads little; encoded once."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = [texts[i] for i in rows]
            enc = self.tokenizer(batch, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            out.append((rows, dict(enc)))
        return out

    def _log_odds(self, batches: list[tuple[np.ndarray, dict[str, torch.Tensor]]], label: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float64)
        with torch.inference_mode():
            for rows, enc in batches:
                logits = self.model(**enc).logits.double().numpy()
                out[rows] = rap.log_odds(rap.softmax(logits)[:, label])
        return out


class MutationScorer(TorchClassifier):
    """The classifier and K reproducible mutants of it, applied one at a time."""

    def __init__(
        self,
        model_dir: Path,
        mutants: int = 8,
        scale: float = 0.1,
        seed: int = 0,
        max_length: int = 64,
        batch_size: int = 64,
    ) -> None:
        if mutants < 1 or scale < 0:
            raise ValueError(f"need mutants >= 1 and scale >= 0, got {mutants} and {scale}")
        super().__init__(model_dir, max_length, batch_size)
        self.mutants, self.scale, self.seed = mutants, scale, seed
        self.weights = mutated_weights(self.model)
        with torch.no_grad():
            self.original = {name: w.detach().clone() for name, w in self.weights.items()}

    @contextmanager
    def _mutate(self, k: int) -> Iterator[None]:
        """Within the block the model is mutant k; the original tensors are copied back on leaving it."""
        state = int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(state)
        try:
            with torch.no_grad():
                for name in sorted(self.weights):
                    w = self.original[name]
                    noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
                    self.weights[name].add_(noise.to(w.device) * (self.scale * w.std()))
            yield
        finally:
            with torch.no_grad():
                for name, w in self.weights.items():
                    w.copy_(self.original[name])

    def scores(self, texts: list[str], label: int) -> np.ndarray:
        """Per text: `label`'s log-odds under the model minus their mean under the K mutants (positive: falls)."""
        if not texts:
            return np.empty(0, dtype=np.float64)
        batches = self._batches(list(texts))
        original = self._log_odds(batches, label, len(texts))
        mutated = np.zeros(len(texts), dtype=np.float64)
        for k in range(self.mutants):
            with self._mutate(k):
                mutated += self._log_odds(batches, label, len(texts))
        return original - mutated / self.mutants
