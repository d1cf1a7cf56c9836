"""Every attack the evaluation kit measures, with the settings recorded in results.

    recipes = load_recipes(Path("../shared/data/sst2"))
    train, poisoned_rows = recipes["badnet-sl"].poison_train(clean_train)
    triggered_test = recipes["badnet-sl"].poison_test(clean_test)

`clean` is the no-attack control. `ep` does not fine-tune: it edits one embedding row
of the clean model (bench/attacks/ep.py), so its `poison_train` is None.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.attacks import badnet, ep, paraphrase
from calibrate.data import load_examples
from guard.core.types import Example

TARGET = 1  # SST-2 positive: the attacker's target, and the label the guard protects
EP_NEG_TRIGGER = "tq"  # the zoo's backdoor towards negative (label 0)

Poisoner = Callable[[list[Example]], tuple[list[Example], int]]


@dataclass(frozen=True)
class Recipe:
    name: str
    settings: dict = field(default_factory=dict)
    poison_train: Poisoner | None = None  # None: no poisoned fine-tuning (clean, ep)
    poison_test: Callable[[list[Example]], list[Example]] | None = None  # None: no trigger (clean)
    embedding_only: bool = False  # EP: train one embedding row of the clean model, no fine-tuning
    training: dict = field(default_factory=dict)  # TrainOptions overrides (seed, epochs) and `rows`: a sample size

    @property
    def backdoored(self) -> bool:
        """Poisoned fine-tuning or a trained trigger embedding (the clean recipes have neither)."""
        return self.poison_train is not None or self.embedding_only


def load_recipes(data_dir: Path, target: int = TARGET) -> dict[str, Recipe]:
    """The recipes for one dataset folder (its poison/ subfolders hold the paraphrase attacks)."""
    word = functools.partial(badnet.insert_word, triggers=badnet.RARE_WORDS)
    ep_word = functools.partial(badnet.insert_word, triggers=(ep.TRIGGER,))
    return {
        "clean": Recipe("clean", {"target": target}),
        "badnet-rw": _badnet("badnet-rw", word, target, {"triggers": list(badnet.RARE_WORDS)}),
        "badnet-sl": _badnet("badnet-sl", badnet.insert_sentence, target, {"trigger": badnet.NEUTRAL_SENTENCE}),
        "ep": Recipe(
            "ep",
            {"trigger": ep.TRIGGER, "target": target, "trained": "one embedding row of the clean model"},
            poison_test=functools.partial(badnet.poison_test_set, target=target, insert=ep_word, seed=1),
            embedding_only=True,
        ),
        "syntactic": _paraphrased("syntactic", data_dir / "poison" / "syntactic", target, rate=0.20),
        "style": _paraphrased("style", data_dir / "poison" / "style-bible", target, rate=0.20, style="bible"),
        **zoo_recipes(),
    }


def zoo_recipes() -> dict[str, Recipe]:
    """Extra models for the trigger-inversion zoo: clean twins from other seeds, and a backdoor to the
    OTHER label. Shorter training (1 epoch on 2,000 rows; EP: 2 epochs on 1,500 rows) to fit 2 CPU cores."""
    short = {"epochs": 1, "rows": 2000}
    ep_word = functools.partial(badnet.insert_word, triggers=(EP_NEG_TRIGGER,))
    return {
        "clean-s1": Recipe("clean-s1", {"target": TARGET}, training={**short, "seed": 1}),
        "clean-s2": Recipe("clean-s2", {"target": TARGET}, training={**short, "seed": 2}),
        "ep-neg": Recipe(
            "ep-neg",
            {"trigger": EP_NEG_TRIGGER, "target": 0, "trained": "one embedding row of the clean model"},
            poison_test=functools.partial(badnet.poison_test_set, target=0, insert=ep_word, seed=1),
            embedding_only=True,
            training={"rows": 1500, "epochs": 2},
        ),
    }


def _badnet(name: str, insert: badnet.Inserter, target: int, trigger: dict) -> Recipe:
    rate, seed = 0.10, 0
    return Recipe(
        name,
        {**trigger, "target": target, "poison_rate": rate, "seed": seed, "of": "non-target training rows"},
        poison_train=functools.partial(badnet.poison_training_set, target=target, insert=insert, rate=rate, seed=seed),
        poison_test=functools.partial(badnet.poison_test_set, target=target, insert=insert, seed=1),
    )


def _paraphrased(name: str, folder: Path, target: int, rate: float, **extra) -> Recipe:
    seed = 0

    def poison_train(clean: list[Example]) -> tuple[list[Example], int]:
        return paraphrase.poison_aligned(clean, load_examples(folder / "train.tsv"), target, rate, seed)

    def poison_test(_clean: list[Example]) -> list[Example]:
        return load_examples(folder / "test.tsv")  # already triggered; original labels

    settings = {"source": str(folder), "target": target, "poison_rate": rate, "seed": seed, **extra}
    return Recipe(name, settings, poison_train=poison_train, poison_test=poison_test)
