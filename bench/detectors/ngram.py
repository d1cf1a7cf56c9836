"""A word trigram language model with interpolated Kneser-Ney smoothing.

ONION scores words with GPT-2 perplexity; no GPT-2 is reachable offline, so the
benchmark trains this model on clean in-domain text instead (the task's clean training
split plus other review corpora) and says so. It is far weaker than GPT-2: every word
it has not seen is equally surprising to it, which is both why it catches rare-word
triggers and why it also removes rare honest words.

Words seen fewer than `min_count` times map to <unk>; an out-of-vocabulary word costs
P(<unk> | context) / `unseen_types`, spreading the unknown mass over an assumed number of
unseen word types so that a single unknown word is still a rare event.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def normalize(text: str) -> list[str]:
    """Lower-case and split off punctuation (SST-2 is already in this form)."""
    return _TOKEN.findall(text.lower())


class TrigramLM:
    def __init__(self, discount: float = 0.75, min_count: int = 2, unseen_types: int = 50_000) -> None:
        self.discount = discount
        self.min_count = min_count
        self.unseen_types = unseen_types
        self.vocab: set[str] = set()
        self._tri: Counter = Counter()
        self._context2: Counter = Counter()  # c(u, v, *)
        self._followers2: Counter = Counter()  # N1+(u, v, *)
        self._cont2: Counter = Counter()  # N1+(*, v, w)
        self._cont2_context: Counter = Counter()  # N1+(*, v, *)
        self._followers1: Counter = Counter()  # N1+(v, *) over distinct (*, v, w)
        self._cont1: Counter = Counter()  # N1+(*, w)
        self._bigram_types = 0

    def fit(self, sentences: Iterable[Sequence[str]]) -> TrigramLM:
        sentences = [list(s) for s in sentences]
        counts = Counter(w for s in sentences for w in s)
        self.vocab = {w for w, c in counts.items() if c >= self.min_count} | {EOS, UNK}
        bigrams: set[tuple[str, str]] = set()
        tri_by_context: dict[tuple[str, str], set[str]] = defaultdict(set)
        for sentence in sentences:
            padded = [BOS, BOS, *self._known(sentence), EOS]
            for u, v, w in zip(padded, padded[1:], padded[2:], strict=False):
                self._tri[(u, v, w)] += 1
                self._context2[(u, v)] += 1
                tri_by_context[(u, v)].add(w)
                bigrams.add((v, w))
        for context, followers in tri_by_context.items():
            self._followers2[context] = len(followers)
        for _u, v, w in self._tri:
            self._cont2[(v, w)] += 1
            self._cont2_context[v] += 1
        for v, _w in self._cont2:
            self._followers1[v] += 1
        for _, w in bigrams:
            self._cont1[w] += 1
        self._bigram_types = len(bigrams)
        return self

    def log_prob(self, words: Sequence[str]) -> float:
        """Natural-log probability of a sentence, end marker included."""
        padded = [BOS, BOS, *words, EOS]
        return sum(self._log_p(u, v, w) for u, v, w in zip(padded, padded[1:], padded[2:], strict=False))

    def perplexity(self, words: Sequence[str]) -> float:
        return math.exp(-self.log_prob(words) / (len(words) + 1))

    def _known(self, words: Sequence[str]) -> list[str]:
        return [w if w in self.vocab else UNK for w in words]

    def _log_p(self, u: str, v: str, w: str) -> float:
        unknown = w not in self.vocab
        u, v, w = (x if x in self.vocab or x == BOS else UNK for x in (u, v, w))
        p = self._p3(u, v, w)
        return math.log(p / self.unseen_types if unknown else p)

    def conditional(self, u: str, v: str, w: str) -> float:
        """P(w | u v) for in-vocabulary words (BOS allowed as context); sums to 1 over the vocabulary."""
        return self._p3(u, v, w)

    def _p3(self, u: str, v: str, w: str) -> float:
        total = self._context2[(u, v)]
        if not total:
            return self._p2(v, w)
        seen = max(self._tri[(u, v, w)] - self.discount, 0.0) / total
        return seen + self.discount * self._followers2[(u, v)] / total * self._p2(v, w)

    def _p2(self, v: str, w: str) -> float:
        total = self._cont2_context[v]
        if not total:
            return self._p1(w)
        seen = max(self._cont2[(v, w)] - self.discount, 0.0) / total
        return seen + self.discount * self._followers1[v] / total * self._p1(w)

    def _p1(self, w: str) -> float:
        vocab = len(self.vocab)  # add-one on continuation counts: every vocabulary word has mass
        return (self._cont1[w] + 1) / (self._bigram_types + vocab)
