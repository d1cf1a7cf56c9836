"""What the repair and inversion benchmarks share: the models under test, cached stages, CACC/ASR.

A stage (one method on one model) stores its result as JSON together with the
settings it ran with: the model's weights hash and the method's options. A later
run reuses it only when the settings are the same and the files it produced are
still there, so a killed run resumes, and a changed budget redoes what it changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.attacks.recipes import Recipe, load_recipes, zoo_recipes
from bench.models import build_model, model_name
from calibrate.inversion.subject import Subject
from calibrate.inversion.unlearn import accuracy
from calibrate.model import WEIGHT_FILES, predict_probs
from calibrate.report import write_json
from guard.core.bundle import sha256_file
from guard.core.types import Example

log = logging.getLogger("bench.stages")
MODELS = ("clean", "badnet-rw", "badnet-sl", "ep", "syntactic", "style")
ZOO = (*MODELS, *zoo_recipes())  # the trigger-inversion zoo adds clean seeds and a backdoor to the other label
CONTROL_TRIGGERS = "badnet-rw"  # the clean model is measured on these inputs (its "ASR": natural flips)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the module docstring as written and every option's default."""


@dataclass(frozen=True)
class Case:
    """One model under test: where it is and what the attacker planted in it."""

    name: str
    model_dir: Path
    backdoored: bool
    target: int
    true_trigger: list[str] | None  # typed triggers (one is used per row); None for paraphrase attacks
    poisoned_test: list[Example]  # triggered test rows with their ORIGINAL labels


def recipe_cases(
    data_dir: Path, names: Iterable[str], model_cache: Path, test: list[Example], train_seed: int | None = None
) -> list[Case]:
    """The cases for recipe names, training any model not in `model_cache` yet (bench.models);
    `train_seed`: the models retrained with that seed (cases named `<attack>-t<seed>`)."""
    recipes = load_recipes(data_dir)
    cases = []
    for name in names:
        recipe = recipes[name]
        info = build_model(recipe, data_dir, model_cache, train_seed=train_seed)
        poison_test = recipe.poison_test or recipes[CONTROL_TRIGGERS].poison_test
        target, case = recipe.settings["target"], model_name(name, train_seed)
        cases.append(Case(case, Path(info["dir"]), recipe.backdoored, target, true_trigger(recipe), poison_test(test)))
    return cases


def true_trigger(recipe: Recipe) -> list[str] | None:
    """The trigger texts of a token-trigger recipe (BadNet, EP); None for the clean control and paraphrases."""
    settings = recipe.settings
    if "triggers" in settings:
        return list(settings["triggers"])
    return [settings["trigger"]] if "trigger" in settings else None


def settings_of(value: object) -> object:
    """Options as plain JSON (tuples become lists), without `progress` flags: they change no result."""
    return _without_progress(json.loads(json.dumps(value, default=_jsonable)))


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)  # paths


def _without_progress(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_progress(v) for k, v in value.items() if k != "progress"}
    if isinstance(value, list):
        return [_without_progress(v) for v in value]
    return value


def weights_sha256(model_dir: Path) -> str:
    """The model's identity in stage settings: a retrained or repaired model redoes every stage on it."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return sha256_file(model_dir / name)
    raise FileNotFoundError(f"{model_dir} holds no model weights ({' or '.join(WEIGHT_FILES)})")


def cached(path: Path, settings: dict, job: Callable[[], dict], produces: Iterable[Path] = ()) -> dict:
    """The result stored at `path` if it was made with `settings` and `produces` still exist; else run `job`."""
    settings = settings_of(settings)
    produces = list(produces)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["settings"] == settings and all(p.exists() for p in produces):
            return stored["result"]
        log.info("   %s: made with other settings or its outputs are gone; redoing it", path)
    log.info("   running %s", path)
    started = time.perf_counter()
    result = job()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    write_json(partial, {"settings": settings, "result": result})
    partial.replace(path)
    log.info("   %s done in %.0f s", path, time.perf_counter() - started)
    return json.loads(path.read_text())["result"]


def measure(subject: Subject, test: list[Example], poisoned: list[Example], target: int) -> dict[str, float]:
    """CACC on the clean test rows; ASR: share of the non-target triggered rows predicted as the target."""
    victims = [r.text for r in poisoned if r.label != target]
    predicted = predict_probs(subject.model, subject.tokenizer, victims).argmax(axis=1)
    return {"cacc": accuracy(subject, test), "asr": float(np.mean(predicted == target))}
