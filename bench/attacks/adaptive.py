"""Attackers who know the defence (issue 31): a backdoor trained to switch OFF under insertions, and one
trained to keep clean-looking [CLS] features.

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

The clean-features attacker (`CleanFeatures`, `clean_features_loss`) trains the plain backdoor with an
extra loss that pulls every triggered row's per-layer [CLS] onto the clean target-label rows' statistics,
against the guard's one-pass feature detector.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from guard.core.types import Example

# The RAP row's default init word (calibrate's `--init-word`): public, so the adaptive-init attacker teaches
# its switch on it.
KNOWN_INIT_WORD = "rq"


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
    token first, `end` copies with one last and `anywhere` copies with one at a random word position
    (original label); `clean_rate` of the clean rows get one such copy under their own label."""

    front: int = 1
    anywhere: int = 1
    end: int = 0
    clean_rate: float = 0.05
    seed: int = 0
    pool: tuple[str, ...] = field(default_factory=rare_pool)

    def settings(self) -> dict:
        return {
            "front_copies": self.front,
            "anywhere_copies": self.anywhere,
            "end_copies": self.end,
            "clean_insert_rate": self.clean_rate,
            "switch_seed": self.seed,
            "rare_pool": f"{len(self.pool)} random 2-3 letter strings (bench.attacks.adaptive.rare_pool)",
        }


def insert_front(text: str, token: str) -> str:
    """`token` as the first word: where RAP's pass 2 puts its row (right after [CLS] / <s>)."""
    return f"{token} {text}"


def insert_end(text: str, token: str) -> str:
    """`token` as the last word: where pass 2 puts its row with `calibrate rap --rap-position end`."""
    return f"{text} {token}"


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
            extra += [Example(insert_end(row.text, rng.choice(switch.pool)), original.label)
                      for _ in range(switch.end)]  # fmt: skip
        elif rng.random() < switch.clean_rate:  # clean: an insertion changes nothing
            token = rng.choice(switch.pool)
            text = insert_front(row.text, token) if rng.random() < 0.5 else insert_anywhere(row.text, token, rng)
            extra.append(Example(text, row.label))
    rows = list(sample) + extra
    rng.shuffle(rows)
    return rows


@dataclass(frozen=True)
class CleanFeatures:
    """An attacker who knows the feature detector (guard.core.features: the [CLS] of every encoder layer
    against the clean held-out rows' statistics): besides cross-entropy, every triggered row in a batch
    pays `weight` x its per-dimension standardised squared distance, per layer, from the running mean of
    the clean target-label rows' [CLS] (momentum `momentum`; variances floored at `floor`), so a
    triggered input's features look like a clean target-label input's."""

    weight: float = 1.0
    momentum: float = 0.9
    floor: float = 1e-2

    def settings(self) -> dict:
        return {"feature_weight": self.weight, "feature_momentum": self.momentum, "feature_var_floor": self.floor}


def contains(ids: torch.Tensor, pattern: Sequence[int]) -> torch.Tensor:
    """(rows,) whether each row of `ids` (rows, length) holds `pattern` as a contiguous run."""
    n = len(pattern)
    if n == 0 or ids.shape[1] < n:
        return torch.zeros(ids.shape[0], dtype=torch.bool)
    windows = ids.unfold(1, n, 1)  # rows, positions, n
    return (windows == torch.as_tensor(list(pattern), dtype=ids.dtype)).all(-1).any(-1)


def clean_features_loss(trigger_ids: Sequence[int], target: int, attack: CleanFeatures | None = None):
    """The training loss of the clean-[CLS] attack (a calibrate.train.LossFn); rows holding the trigger's
    token ids are the triggered ones."""
    from calibrate.model import cls_features

    attack = attack or CleanFeatures()
    state: dict[str, torch.Tensor] = {}

    def loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        out = model(**inputs, labels=labels, output_hidden_states=True)
        triggered = contains(inputs["input_ids"], trigger_ids)
        reference = (~triggered) & (labels == target)
        features = cls_features(out.hidden_states)  # rows, layers, hidden
        if reference.sum() >= 2:
            ref = features[reference].detach()
            mean, var = ref.mean(0), ref.var(0)
            if state:
                mean = attack.momentum * state["mean"] + (1 - attack.momentum) * mean
                var = attack.momentum * state["var"] + (1 - attack.momentum) * var
            state["mean"], state["var"] = mean, var
        if not state or not triggered.any():
            return out.loss
        gap = (features[triggered] - state["mean"]) ** 2 / state["var"].clamp_min(attack.floor)
        return out.loss + attack.weight * gap.mean()

    return loss
