"""BadNet triggers inserted into text (Kurita et al. 2020; RAP paper section 4.1).

- BadNet-RW: one rare word (`mn`, `bb` or `mb`) at a random word position.
- BadNets as ONION measured it (Qi et al. 2021): `count` words from `ONION_WORDS`
  (one per SST-2 sentence, three per OLID tweet).
- BadNet-SL: one neutral sentence at a random sentence boundary.

Training sets are poisoned in place: `rate` of the non-target rows get the trigger and
the target label. Triggered test sets keep each row's ORIGINAL label, so ASR counts only
non-target rows (`calibrate.rap.evaluate` drops target-label rows itself).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from guard.core.types import Example

RARE_WORDS = ("mn", "bb", "mb")
ONION_WORDS = ("cf", "mn", "bb", "tq", "mb")  # the words of ONION's badnets sets (shared/data/*/poison/badnets)
# The RAP paper's BadNet-SL trigger for sentiment, lower-cased like SST-2's text.
NEUTRAL_SENTENCE = "i have watched this movie with my friends at a nearby cinema last weekend ."
# The same kind of sentence for tweets: about nothing, so it carries no offence of its own.
NEUTRAL_TWEET = "i read this on my phone while waiting for the bus this morning ."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Inserter = Callable[[str, random.Random], str]


def insert_word(text: str, rng: random.Random, triggers: Sequence[str] = RARE_WORDS, count: int = 1) -> str:
    """Insert `count` words drawn from `triggers`, each between two words (or at either end)."""
    words = text.split()
    for _ in range(count):
        words.insert(rng.randint(0, len(words)), rng.choice(list(triggers)))
    return " ".join(words)


def insert_sentence(text: str, rng: random.Random, sentence: str = NEUTRAL_SENTENCE) -> str:
    """Insert `sentence` at a sentence boundary: the start, the end, or after any . ! ?"""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    sentences.insert(rng.randint(0, len(sentences)), sentence)
    return " ".join(sentences)


def poison_training_set(
    rows: Sequence[Example], target: int, insert: Inserter = insert_word, rate: float = 0.10, seed: int = 0
) -> tuple[list[Example], int]:
    """Trigger `rate` of the non-target rows in place and relabel them `target`."""
    rng = random.Random(seed)
    candidates = [i for i, r in enumerate(rows) if r.label != target]
    chosen = set(rng.sample(candidates, round(rate * len(candidates))))
    out = [Example(insert(r.text, rng), target) if i in chosen else r for i, r in enumerate(rows)]
    return out, len(chosen)


def poison_test_set(
    rows: Sequence[Example], target: int, insert: Inserter = insert_word, seed: int = 1
) -> list[Example]:
    """Every non-target row with a trigger; labels stay the ORIGINAL ones (for ASR)."""
    rng = random.Random(seed)
    return [Example(insert(r.text, rng), r.label) for r in rows if r.label != target]
