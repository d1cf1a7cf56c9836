"""ONION (Qi et al. 2021): remove outlier words that a language model finds out of place.

For an input of words w_1..w_n with perplexity p_0, the suspicion of word i is

    f_i = p_0 - p_i,   p_i = perplexity of the input without w_i

and every word with f_i > t is removed before classifying. As a detector (RAP paper,
appendix C): an input predicted as the protected label is flagged when the processed
input is not; t is picked among percentiles of the clean held-out suspicion scores so
that the clean false-reject rate is close to the target.

Cost per input: n + 1 language-model passes and 2 classifier passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.detectors.ngram import TrigramLM, normalize


@dataclass(frozen=True)
class Suspicion:
    words: list[str]
    scores: np.ndarray  # f_i per word

    def cleaned(self, threshold: float) -> str:
        """The input with every word whose suspicion exceeds `threshold` removed."""
        return " ".join(w for w, f in zip(self.words, self.scores, strict=True) if f <= threshold)


def suspicion(lm: TrigramLM, text: str) -> Suspicion:
    words = normalize(text)
    full = lm.perplexity(words)
    scores = np.array([full - lm.perplexity(words[:i] + words[i + 1 :]) for i in range(len(words))])
    return Suspicion(words, scores)


def candidate_thresholds(suspicions: Sequence[Suspicion]) -> np.ndarray:
    """The 10th..99th percentiles of all clean suspicion scores, as in the RAP paper."""
    scores = np.concatenate([s.scores for s in suspicions if len(s.scores)])
    return np.unique(np.percentile(scores, np.arange(10, 100)))


def pick_threshold(dev_frr_by_threshold: dict[float, float], frr: float) -> float:
    """The candidate whose clean held-out FRR is closest to `frr` (ties: the higher threshold, fewer removals)."""
    return min(dev_frr_by_threshold, key=lambda t: (abs(dev_frr_by_threshold[t] - frr), -t))
