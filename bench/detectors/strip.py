"""STRIP for text (Gao et al. 2019; as specified in the RAP paper, appendix C).

For an input, make N copies; in each, replace k% of the words with words drawn from
held-out samples of the non-target classes. A trigger keeps the model's prediction
fixed, so a poisoned input's predictions vary little: low entropy. Score:

    H(x) = -(1/N) * sum_n sum_i y_i^n log y_i^n / log M

per input (M classes). A public implementation reshapes the (inputs x copies) matrix
the wrong way round and averages entropies ACROSS inputs; here the copies of one input
are always reduced together. Inputs with H below the threshold are flagged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Probs = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class StripOptions:
    copies: int = 20  # N, as chosen in the RAP paper
    replace_ratio: float = 0.3  # k
    seed: int = 0


def perturb(text: str, pool: Sequence[str], ratio: float, rng: random.Random) -> str:
    """Replace round(ratio * words) words (at least one) at random positions with pool words."""
    words = text.split()
    if not words:
        return text
    count = min(len(words), max(1, round(ratio * len(words))))
    for position in rng.sample(range(len(words)), count):
        words[position] = rng.choice(pool)
    return " ".join(words)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """probs (inputs, copies, classes) -> mean normalised entropy per input (inputs,)."""
    if probs.ndim != 3:
        raise ValueError(f"expected (inputs, copies, classes), got shape {probs.shape}")
    clipped = np.clip(probs, 1e-12, 1.0)
    per_copy = -(clipped * np.log(clipped)).sum(axis=2) / np.log(probs.shape[2])
    return per_copy.mean(axis=1)


def strip_entropies(probs_of: Probs, texts: Sequence[str], pool: Sequence[str], options: StripOptions) -> np.ndarray:
    """H(x) for each text; `pool` holds words of held-out non-target samples.

    `probs_of(copies)` returns class probabilities (copies, classes), in order.
    """
    if not pool:
        raise ValueError("STRIP needs a non-empty pool of replacement words")
    rng = random.Random(options.seed)
    copies = [perturb(t, pool, options.replace_ratio, rng) for t in texts for _ in range(options.copies)]
    probs = probs_of(copies) if copies else np.empty((0, 2))
    return normalized_entropy(probs.reshape(len(texts), options.copies, -1))


def word_pool(texts: Sequence[str]) -> list[str]:
    """Every word occurrence of these texts (so common words are drawn more often, as in STRIP)."""
    return [w for t in texts for w in t.split()]
