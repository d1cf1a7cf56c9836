"""BadNet-RW: a rare trigger word inserted at a random position (Kurita et al. 2020)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from guard.core.types import Example

RARE_WORDS = ("mn", "bb", "mb")


def insert_trigger(text: str, rng: random.Random, triggers: Sequence[str] = RARE_WORDS) -> str:
    words = text.split()
    words.insert(rng.randint(0, len(words)), rng.choice(list(triggers)))
    return " ".join(words)


def poison_training_set(
    rows: Sequence[Example], target: int, rate: float = 0.10, seed: int = 0, triggers: Sequence[str] = RARE_WORDS
) -> tuple[list[Example], int]:
    """Trigger `rate` of the non-target rows in place and relabel them `target`."""
    rng = random.Random(seed)
    candidates = [i for i, r in enumerate(rows) if r.label != target]
    chosen = set(rng.sample(candidates, round(rate * len(candidates))))
    out = [Example(insert_trigger(r.text, rng, triggers), target) if i in chosen else r for i, r in enumerate(rows)]
    return out, len(chosen)


def poison_test_set(
    rows: Sequence[Example], target: int, seed: int = 1, triggers: Sequence[str] = RARE_WORDS
) -> list[Example]:
    """Every non-target row with a trigger; labels stay the ORIGINAL ones (for ASR)."""
    rng = random.Random(seed)
    return [Example(insert_trigger(r.text, rng, triggers), r.label) for r in rows if r.label != target]
