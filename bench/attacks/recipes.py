"""Every attack the evaluation kit measures, with the settings recorded in results.

    recipes = load_recipes(Path("../shared/data/sst2"))
    train, poisoned_rows = recipes["badnet-sl"].poison_train(clean_train)
    triggered_test = recipes["badnet-sl"].poison_test(clean_test)

`clean` is the no-attack control. `ep` does not fine-tune: it edits one embedding row
of the clean model (bench/attacks/ep.py), so its `poison_train` is None. `badnets` is the
rare-word attack as ONION measured it, tested on the dataset's own `poison/badnets` set.
What differs per dataset (the BadNet-SL sentence, trigger words per text, training rows)
is in `DATASETS`, keyed by the folder's name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.attacks import adaptive, badnet, ep, paraphrase
from calibrate.data import load_examples
from calibrate.train import LossFn
from guard.core.types import Example

TARGET = 1  # SST-2 positive: the attacker's target, and the label the guard protects
EP_NEG_TRIGGER = "tq"  # the zoo's backdoor towards negative (label 0)
# The adaptive attacks (and their plain twin) fine-tune on 2,000 training rows (sampled after poisoning, as OLID's
# recipes do) + the switch-off rows: 3 epochs on all 6,920 SST-2 rows ran at ~10 s a step (~2 h) on the shared
# 2 cores. At 10% of non-target rows and 2 epochs the switch-off rows (twice the triggered ones) kept the backdoor
# from being learned (SST-2 ASR 1.5%); 25% and 3 epochs plant it.
ADAPTIVE_TRAINING = {"rows": 2000, "epochs": 3}
ADAPTIVE_RATE = 0.25

Poisoner = Callable[[list[Example]], tuple[list[Example], int]]
# (training sample as poisoned, the clean rows it came from) -> the rows to train on (adaptive attacks)
Augmenter = Callable[[list[Example], list[Example]], list[Example]]


@dataclass(frozen=True)
class DatasetSetup:
    sentence: str = badnet.NEUTRAL_SENTENCE  # BadNet-SL's trigger
    onion_words_per_text: int = 1  # as in the dataset's poison/badnets set
    training: dict = field(default_factory=dict)  # applies to every recipe of the dataset


# OLID: 11,915 tweets, longer than SST-2 sentences (1.5 s per step of 32 at 64 tokens on 2 quiet cores);
# 3,000 of them (poisoned first, then sampled) keep a fine-tune near 7 min, so 3 training seeds fit.
DATASETS = {
    "sst2": DatasetSetup(),
    "offenseval": DatasetSetup(badnet.NEUTRAL_TWEET, onion_words_per_text=3, training={"rows": 3000}),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    settings: dict = field(default_factory=dict)
    poison_train: Poisoner | None = None  # None: no poisoned fine-tuning (clean, ep)
    poison_test: Callable[[list[Example]], list[Example]] | None = None  # None: no trigger (clean)
    embedding_only: bool = False  # EP: train one embedding row of the clean model, no fine-tuning
    training: dict = field(default_factory=dict)  # TrainOptions overrides (seed, epochs) and `rows`: a sample size
    augment: Augmenter | None = None  # rows added after sampling (bench/attacks/adaptive.py)
    loss: Callable[[Path], LossFn] | None = None  # base model dir -> the training loss (None: cross-entropy)

    @property
    def backdoored(self) -> bool:
        """Poisoned fine-tuning or a trained trigger embedding (the clean recipes have neither)."""
        return self.poison_train is not None or self.embedding_only


def load_recipes(data_dir: Path, target: int = TARGET) -> dict[str, Recipe]:
    """The recipes for one dataset folder (its poison/ subfolders hold the paraphrase attacks)."""
    setup = DATASETS.get(data_dir.name, DatasetSetup())
    word = functools.partial(badnet.insert_word, triggers=badnet.RARE_WORDS)
    onion = functools.partial(badnet.insert_word, triggers=badnet.ONION_WORDS, count=setup.onion_words_per_text)
    sentence = functools.partial(badnet.insert_sentence, sentence=setup.sentence)
    ep_word = functools.partial(badnet.insert_word, triggers=(ep.TRIGGER,))
    ep_recipe = Recipe(
        "ep",
        {"trigger": ep.TRIGGER, "target": target, "trained": "one embedding row of the clean model"},
        poison_test=functools.partial(badnet.poison_test_set, target=target, insert=ep_word, seed=1),
        embedding_only=True,
    )
    recipes = {
        "clean": Recipe("clean", {"target": target}),
        "badnet-rw": _badnet("badnet-rw", word, target, {"triggers": list(badnet.RARE_WORDS)}),
        "badnets": _onion_badnets(onion, data_dir / "poison" / "badnets", target, setup.onion_words_per_text),
        "badnet-sl": _badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}),
        "ep": ep_recipe,
        "ep-bounded": dataclasses.replace(
            ep_recipe,
            name="ep-bounded",
            settings={**ep_recipe.settings, "trained": "one embedding row, norm <= the vocabulary's p99"},
            training={"max_norm_quantile": 0.99},
        ),
        "adaptive-sl": _insertion_switch(
            _badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}, rate=ADAPTIVE_RATE)
        ),
        "adaptive-cls": _clean_features(
            _badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}, rate=ADAPTIVE_RATE)
        ),
        # both at once: switches off under insertions AND keeps clean-looking [CLS]
        "adaptive-both": _clean_features(
            _insertion_switch(_badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}, rate=ADAPTIVE_RATE)),
            name="adaptive-both",
        ),
        # both, by an attacker who also read the guard's defaults: the switch is taught on the RAP row's
        # public default init word alone, at the front only (where pass 2 puts it)
        "adaptive-init": _clean_features(
            _insertion_switch(
                _badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}, rate=ADAPTIVE_RATE),
                adaptive.InsertionSwitch(front=2, anywhere=0, pool=(adaptive.KNOWN_INIT_WORD,)),
            ),
            name="adaptive-init",
        ),
        # the same attacker, not knowing which end of the row pass 2 puts its row at (`--rap-position`): the
        # switch taught on the default init word at the front and at the end, one copy each
        "adaptive-init-ends": _clean_features(
            _insertion_switch(
                _badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}, rate=ADAPTIVE_RATE),
                adaptive.InsertionSwitch(front=1, end=1, anywhere=0, pool=(adaptive.KNOWN_INIT_WORD,)),
            ),
            name="adaptive-init-ends",
        ),
        # BadNet-SL on the adaptive attacks' sample and rate: the plain attack they are compared with
        "badnet-sl-2k": dataclasses.replace(
            _badnet("badnet-sl", sentence, target, {"trigger": setup.sentence}, rate=ADAPTIVE_RATE),
            name="badnet-sl-2k",
            training=ADAPTIVE_TRAINING,
        ),
        "syntactic": _paraphrased("syntactic", data_dir / "poison" / "syntactic", target, rate=0.20),
        "style": _paraphrased("style", data_dir / "poison" / "style-bible", target, rate=0.20, style="bible"),
    }
    recipes = {name: _with_training(r, setup.training) for name, r in recipes.items()}
    return {**recipes, **zoo_recipes()}


def _with_training(recipe: Recipe, training: dict) -> Recipe:
    """The dataset's training settings, under the recipe's own."""
    if not training:
        return recipe
    return dataclasses.replace(recipe, training={**training, **recipe.training})


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


def _badnet(name: str, insert: badnet.Inserter, target: int, trigger: dict, rate: float = 0.10) -> Recipe:
    seed = 0
    return Recipe(
        name,
        {**trigger, "target": target, "poison_rate": rate, "seed": seed, "of": "non-target training rows"},
        poison_train=functools.partial(badnet.poison_training_set, target=target, insert=insert, rate=rate, seed=seed),
        poison_test=functools.partial(badnet.poison_test_set, target=target, insert=insert, seed=1),
    )


def _insertion_switch(recipe: Recipe, switch: adaptive.InsertionSwitch | None = None) -> Recipe:
    """`recipe` by an attacker who knows RAP: its backdoor switches off when a rare token is inserted."""
    avoid = tuple(recipe.settings.get("triggers", ()))
    switch = switch or adaptive.InsertionSwitch(pool=adaptive.rare_pool(avoid=avoid))
    return dataclasses.replace(
        recipe,
        name=f"adaptive-{recipe.name.removeprefix('badnet-')}",
        settings={**recipe.settings, "adaptive": "insertion-switch", **switch.settings()},
        augment=functools.partial(adaptive.insertion_switch, switch=switch),
        training={**ADAPTIVE_TRAINING, **recipe.training},
    )


def _clean_features(recipe: Recipe, attack: adaptive.CleanFeatures | None = None, name: str = "adaptive-cls") -> Recipe:
    """`recipe` by an attacker who knows the feature detector: triggered rows keep clean target-label [CLS]."""
    attack = attack or adaptive.CleanFeatures()

    def loss(base: Path) -> LossFn:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base))
        ids = tokenizer(recipe.settings["trigger"], add_special_tokens=False)["input_ids"]
        return adaptive.clean_features_loss(ids, recipe.settings["target"], attack)

    return dataclasses.replace(
        recipe,
        name=name,
        settings={
            **recipe.settings,
            "adaptive": "+".join(filter(None, (recipe.settings.get("adaptive"), "clean-features"))),
            **attack.settings(),
        },
        loss=loss,
        training={**ADAPTIVE_TRAINING, **recipe.training},
    )


def _onion_badnets(insert: badnet.Inserter, folder: Path, target: int, per_text: int) -> Recipe:
    """Trained like BadNet-RW (10%, our own insertion of ONION's words), tested on ONION's own triggered set."""
    recipe = _badnet("badnets", insert, target, {"triggers": list(badnet.ONION_WORDS), "per_text": per_text})
    test_file = folder / "test.tsv"

    def poison_test(clean: list[Example]) -> list[Example]:
        if test_file.is_file():
            return load_examples(test_file)  # already triggered; original labels
        return recipe.poison_test(clean)

    return dataclasses.replace(recipe, poison_test=poison_test, settings={**recipe.settings, "test": str(test_file)})


def _paraphrased(name: str, folder: Path, target: int, rate: float, **extra) -> Recipe:
    seed = 0

    def poison_train(clean: list[Example]) -> tuple[list[Example], int]:
        return paraphrase.poison_aligned(clean, load_examples(folder / "train.tsv"), target, rate, seed)

    def poison_test(_clean: list[Example]) -> list[Example]:
        return load_examples(folder / "test.tsv")  # already triggered; original labels

    settings = {"source": str(folder), "target": target, "poison_rate": rate, "seed": seed, **extra}
    return Recipe(name, settings, poison_train=poison_train, poison_test=poison_test)
