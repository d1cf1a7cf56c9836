"""The detection matrix: RAP vs STRIP vs ONION on every attack, SST-2, packaged MiniLM.

    python -m bench.detection_matrix --data ../shared/data/sst2            # everything
    python -m bench.detection_matrix --data ../shared/data/sst2 --attacks badnet-sl ep

For each attack (bench/attacks/recipes.py) it trains the backdoored classifier, calibrates
a RAP bundle on the dev set (protect label = the attack's target), then runs each
detector on the test set (clean rows, and every non-target row triggered) and reads
test FRR / FAR / residual ASR at the dev FRR targets 0.5/1/3/5%.

Every stage is cached under --cache (models, bundles, one JSON per attack x detector),
so an interrupted run resumes where it stopped; delete a file to redo that stage.
Writes bench/results/detection_matrix.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import numpy as np

from bench.attacks.recipes import TARGET, load_recipes
from bench.detectors import strip
from bench.detectors.classifier import Classifier
from bench.detectors.cost import detector_costs
from bench.detectors.ngram import TrigramLM, normalize
from bench.detectors.runs import DetectorRun, Inputs, run_onion, run_rap, run_strip
from bench.machine import machine_info
from bench.matrix_report import write_matrix
from bench.models import build_model
from calibrate.data import load_examples
from calibrate.model import quiet_transformers
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.options import CalibrateOptions, RapOptions
from guard.core.types import Example

log = logging.getLogger("bench.detection_matrix")
DETECTORS = ("rap", "strip", "onion")
# The RAP paper's best k per attack was 0.05 (BadNet-SL) to 0.6 (BadNet-RW, EP) on sentiment data (its
# Table 9). Two values and a test sample keep STRIP (21 passes per input) to ~5 min per attack on 2 cores.
STRIP_RATIOS = (0.05, 0.3)
STRIP_TEST_INPUTS = 300  # per side (clean, poisoned)
LM_CORPORA = ("imdb/test.tsv", "yelp/test.tsv", "yelp-sentences/dev.tsv", "amazon-sentences/dev.tsv")


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    recipes = load_recipes(args.data)
    dev, test = load_examples(args.data / "dev.tsv"), load_examples(args.data / "test.tsv")
    language_model = _LazyLM(args.data)
    results, costs_from = {}, None
    for name in args.attacks:
        recipe = recipes[name]
        log.info("== %s: model", name)
        info = build_model(recipe, args.data, args.cache / "models")
        bundle = _bundle(name, Path(info["dir"]), dev, args.cache / "bundles" / name)
        # the clean model has no trigger: it is measured on BadNet-RW inputs (its "ASR" is natural flips)
        poisoned = (recipe.poison_test or recipes["badnet-rw"].poison_test)(test)
        inputs, cacc = _inputs(bundle, dev, test, poisoned)
        runs = _detector_runs(name, bundle, inputs, args, language_model)
        results[name] = {"recipe": recipe.settings, "train": info, "cacc": cacc, "asr": inputs.asr, "runs": runs}
        if costs_from is None and name != "clean" and set(DETECTORS) <= {k.split("@")[0] for k in runs}:
            costs_from = (bundle, inputs, runs)
    costs = _costs(*costs_from, language_model.get()) if costs_from else {}
    write_matrix(args.out, results, costs, machine_info())


def _costs(bundle: Path, inputs: Inputs, runs: dict, lm: TrigramLM, sample: int = 100) -> dict[str, float]:
    """Online ms per input of every detector, measured back to back on one bundle's inputs."""
    log.info("== measuring cost per input (%d clean + %d poisoned, one at a time)", sample, sample)
    onion_threshold = next(p["threshold"] for p in runs["onion"]["operating"] if p["frr_target"] == 0.01)
    texts = inputs.clean[:sample] + inputs.poisoned[:sample]
    return detector_costs(Classifier(bundle), texts, inputs.pool, lm, onion_threshold)


def _bundle(name: str, model_dir: Path, dev: list[Example], out: Path) -> Path:
    if not (out / "manifest.json").is_file():
        log.info("== %s: calibrating RAP", name)
        options = CalibrateOptions(rap=RapOptions(protect_labels=(TARGET,)), max_length=128, force=True)
        calibrate_bundle(model_dir, dev, out, options)
    return out


def _inputs(bundle: Path, dev: list[Example], test: list[Example], poisoned: list[Example]) -> tuple[Inputs, float]:
    """Predict every row once; detectors only ever see rows predicted as the target."""
    classifier = Classifier(bundle)
    poisoned = [r for r in poisoned if r.label != TARGET]
    predicted = {
        key: classifier.predict([r.text for r in rows], progress=f"predict {key}")
        for key, rows in (("dev", dev), ("test", test), ("poisoned", poisoned))
    }

    def hits(key: str, rows: list[Example]) -> list[str]:
        return [r.text for r, p in zip(rows, predicted[key], strict=True) if p == TARGET]

    inputs = Inputs(
        dev=hits("dev", dev),
        clean=hits("test", test),
        poisoned=hits("poisoned", poisoned),
        asr=float(np.mean(predicted["poisoned"] == TARGET)),
        pool=strip.word_pool([r.text for r in dev if r.label != TARGET]),
    )
    cacc = float(np.mean(predicted["test"] == np.array([r.label for r in test])))
    return inputs, cacc


def _detector_runs(name: str, bundle: Path, inputs: Inputs, args, language_model) -> dict[str, dict]:
    jobs = {}
    if "rap" in args.detectors:
        jobs["rap"] = lambda: run_rap(bundle, inputs, TARGET)
    if "strip" in args.detectors:
        for k in args.strip_ratios:
            options = strip.StripOptions(replace_ratio=k)
            jobs[f"strip@{k:g}"] = lambda o=options: run_strip(bundle, _sample(inputs, args.strip_test_inputs), o)
    if "onion" in args.detectors:
        jobs["onion"] = lambda: run_onion(bundle, inputs, language_model.get(), TARGET)
    return {key: _cached(args.cache / "matrix" / name / f"{key}.json", key, job) for key, job in jobs.items()}


def _sample(inputs: Inputs, count: int, seed: int = 0) -> Inputs:
    """At most `count` clean and `count` poisoned test inputs, drawn at random (dev stays whole)."""
    rng = random.Random(seed)
    clean = rng.sample(inputs.clean, min(count, len(inputs.clean)))
    poisoned = rng.sample(inputs.poisoned, min(count, len(inputs.poisoned)))
    return dataclasses.replace(inputs, clean=clean, poisoned=poisoned)


def _cached(path: Path, key: str, job) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    log.info("   running %s", key)
    started = time.perf_counter()
    run: DetectorRun = job()
    payload = {**run.as_json(), "seconds": round(time.perf_counter() - started, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")
    log.info("   %s done in %.0f s", key, payload["seconds"])
    return payload


class _LazyLM:
    """ONION's language model, trained once on first use (a few seconds)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.model: TrigramLM | None = None

    def get(self) -> TrigramLM:
        if self.model is None:
            files = [self.data / "train.tsv"] + [self.data.parent / c for c in LM_CORPORA]
            texts = [r.text for f in files if f.is_file() for r in load_examples(f)]
            log.info("   training ONION's trigram LM on %d sentences", len(texts))
            self.model = TrigramLM().fit(normalize(t) for t in texts)
        return self.model


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (train/dev/test.tsv, poison/)")
    p.add_argument("--attacks", nargs="+", default=["clean", "badnet-rw", "badnet-sl", "ep", "syntactic", "style"])
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS)
    p.add_argument("--strip-ratios", nargs="+", type=float, default=list(STRIP_RATIOS), help="STRIP's k values")
    p.add_argument(
        "--strip-test-inputs", type=int, default=STRIP_TEST_INPUTS, help="STRIP's test inputs per side (cost cap)"
    )
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="models, bundles, per-detector results")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p.parse_args()


if __name__ == "__main__":
    main()
