"""An attacker who has read the RAP paper: a backdoor trained to switch OFF under insertions (issue 31).

RAP's second pass inserts one rare token after the first special token and flags inputs whose
protect-label probability barely moves. This attacker trains the backdoor so that an inserted
rare token removes it: every triggered training row also appears with a random rare token
inserted, once at the front and once anywhere, under its ORIGINAL label; and a few clean rows
appear with such an insertion under their own label, so an insertion alone means nothing.
The triggered input then moves MORE under pass 2 than a clean one does.

    sample = insertion_switch(poisoned_sample, originals, InsertionSwitch(seed=0))

`poisoned_sample[i]` is the row as the plain attack left it (trigger + target label for the
triggered ones), `originals[i]` the clean row it came from; a row that differs from its
original is a triggered one. The extra rows are appended and the whole set shuffled.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from guard.core.types import Example


def rare_pool(seed: int = 0, size: int = 200, avoid: Sequence[str] = ()) -> tuple[str, ...]:
    """`size` random two- and three-letter lowercase strings: the kind of rare word a RAP row is
    initialised from (the guard's default init word is `rq`), none of `avoid` (the attack's triggers)."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    pool: list[str] = []
    while len(pool) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.choice((2, 3))))
        if word not in pool and word not in avoid:
            pool.append(word)
    return tuple(pool)


@dataclass(frozen=True)
class InsertionSwitch:
    """How the backdoor is taught to switch off: per triggered row, `front` copies with a rare
    token first and `anywhere` copies with one at a random word position (original label);
    `clean_rate` of the clean rows get one such copy under their own label."""

    front: int = 1
    anywhere: int = 1
    clean_rate: float = 0.05
    seed: int = 0
    pool: tuple[str, ...] = field(default_factory=rare_pool)

    def settings(self) -> dict:
        return {
            "front_copies": self.front,
            "anywhere_copies": self.anywhere,
            "clean_insert_rate": self.clean_rate,
            "switch_seed": self.seed,
            "rare_pool": f"{len(self.pool)} random 2-3 letter strings (bench.attacks.adaptive.rare_pool)",
        }


def insert_front(text: str, token: str) -> str:
    """`token` as the first word: where RAP's pass 2 puts its row (right after [CLS] / <s>)."""
    return f"{token} {text}"


def insert_anywhere(text: str, token: str, rng: random.Random) -> str:
    """`token` between two words of `text`, or at either end."""
    words = text.split()
    words.insert(rng.randint(0, len(words)), token)
    return " ".join(words)


def insertion_switch(
    sample: Sequence[Example], originals: Sequence[Example], switch: InsertionSwitch = InsertionSwitch()
) -> list[Example]:
    """The training rows with the switch-off rows appended, shuffled (seeded)."""
    if len(sample) != len(originals):
        raise ValueError(f"{len(sample)} training rows but {len(originals)} originals")
    rng = random.Random(switch.seed)
    extra: list[Example] = []
    for row, original in zip(sample, originals, strict=True):
        if row != original:  # triggered: the backdoor must NOT fire once a rare token is inserted
            extra += [Example(insert_front(row.text, rng.choice(switch.pool)), original.label)
                      for _ in range(switch.front)]  # fmt: skip
            extra += [Example(insert_anywhere(row.text, rng.choice(switch.pool), rng), original.label)
                      for _ in range(switch.anywhere)]  # fmt: skip
        elif rng.random() < switch.clean_rate:  # clean: an insertion changes nothing
            token = rng.choice(switch.pool)
            text = insert_front(row.text, token) if rng.random() < 0.5 else insert_anywhere(row.text, token, rng)
            extra.append(Example(text, row.label))
    rows = list(sample) + extra
    rng.shuffle(rows)
    return rows
