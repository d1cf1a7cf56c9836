"""Build (or reuse) the clean and backdoored classifiers the benchmarks measure.

    python -m bench.models --data ../shared/data/sst2 badnet-sl ep

Each model is trained once into `<cache>/<attack>/` with a `bench-train.json` beside
it; later calls return that record without training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
from pathlib import Path

from bench.attacks.ep import EpOptions, poison_embedding
from bench.attacks.recipes import Recipe, load_recipes
from calibrate.data import load_examples
from calibrate.model import default_base_model, quiet_transformers
from calibrate.options import TrainOptions
from calibrate.train import train_classifier
from guard.core.types import Example

TRAIN_OPTIONS = TrainOptions(epochs=3, learning_rate=1e-4, batch_size=32, max_length=64)


def build_model(
    recipe: Recipe, data_dir: Path, cache: Path, options: TrainOptions = TRAIN_OPTIONS, train_seed: int | None = None
) -> dict:
    """Train the model for `recipe` once; later calls reuse the cached model dir.

    `train_seed` retrains with another seed (fine-tuning order and init of the head; for EP the
    trigger row's training order, from the same clean model) into `<attack>-t<seed>/`."""
    out = cache / model_name(recipe.name, train_seed)
    info_path = out / "bench-train.json"
    if info_path.is_file():
        return {"dir": str(out), **json.loads(info_path.read_text())}
    clean_train = load_examples(data_dir / "train.tsv")
    if recipe.embedding_only:
        train = _training_rows(recipe, clean_train)
        clean = build_model(load_recipes(data_dir)["clean"], data_dir, cache, options)
        ep_options = EpOptions(
            trigger=recipe.settings["trigger"],
            epochs=recipe.training.get("epochs", 1),
            max_norm_quantile=recipe.training.get("max_norm_quantile"),
        )
        if train_seed is not None:
            ep_options = dataclasses.replace(ep_options, seed=train_seed)
        seconds = poison_embedding(Path(clean["dir"]), train, recipe.settings["target"], out, ep_options)
        info = {"model": recipe.name, "from": clean["dir"], "train_rows": len(train)}
        info["train_seconds"] = round(seconds, 1)
    else:
        options = dataclasses.replace(options, **{k: v for k, v in recipe.training.items() if k != "rows"})
        if train_seed is not None:
            options = dataclasses.replace(options, seed=train_seed)
        train, poisoned_rows = _poisoned_sample(recipe, clean_train)
        base = default_base_model()
        loss = {} if recipe.loss is None else {"loss_fn": recipe.loss(base)}  # an adaptive attack's own loss
        result = train_classifier(base, train, out, options, dev=load_examples(data_dir / "dev.tsv"), **loss)
        info = {
            "model": recipe.name,
            "train_rows": result.train_rows,
            "poisoned_rows": poisoned_rows,
            "train_seconds": round(result.seconds, 1),
            "dev_accuracy": result.dev_accuracy,
            "options": options.__dict__,
        }
    info = {**info, "dir": str(out), "attack": recipe.settings, "train_seed": train_seed}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def model_name(attack: str, train_seed: int | None) -> str:
    """The cache folder of one trained model: the attack's name, `-t<seed>` for a retrained copy."""
    return attack if train_seed is None else f"{attack}-t{train_seed}"


def attack_of(model: str) -> str:
    """The attack a `model_name` was trained for ("style-t1" -> "style")."""
    return re.sub(r"-t\d+$", "", model)


def _poisoned_sample(recipe: Recipe, clean: list[Example]) -> tuple[list[Example], int]:
    """Poison the whole split (paraphrase files are aligned with it), then draw the recipe's sample
    (an adaptive recipe adds its rows to it).

    Returns the rows and how many of them carry the trigger under the target label."""
    if recipe.poison_train is None:
        return _training_rows(recipe, clean), 0
    poisoned, _ = recipe.poison_train(clean)
    chosen = _training_rows(recipe, list(range(len(clean))))  # the same rows as sampling `poisoned` itself
    sample, originals = [poisoned[i] for i in chosen], [clean[i] for i in chosen]
    count = sum(row != original for row, original in zip(sample, originals, strict=True))
    if recipe.augment is not None:  # an adaptive attack's extra rows, made from the rows it trains on
        sample = recipe.augment(sample, originals)
    return sample, count


def _training_rows(recipe: Recipe, rows: list[Example]) -> list[Example]:
    """The training split, or a seeded sample of it where the recipe trains on fewer rows."""
    count = recipe.training.get("rows")
    if count is None or count >= len(rows):
        return rows
    return random.Random(recipe.training.get("seed", 0)).sample(rows, count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset folder (train/dev/test.tsv, poison/)")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache/models"))
    p.add_argument("--epochs", type=int, default=TRAIN_OPTIONS.epochs, help="fine-tuning epochs for new models")
    p.add_argument("--train-seed", type=int, help="retrain with this seed into <attack>-t<seed>/")
    p.add_argument("attacks", nargs="*", help="attack names (default: all)")
    args = p.parse_args()
    quiet_transformers()
    recipes = load_recipes(args.data)
    for name in args.attacks or list(recipes):
        options = dataclasses.replace(TRAIN_OPTIONS, epochs=args.epochs)
        print(json.dumps(build_model(recipes[name], args.data, args.cache, options, args.train_seed)), flush=True)


if __name__ == "__main__":
    main()
