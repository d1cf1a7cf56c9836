"""A tiny backdoored sentiment classifier, trained in seconds, and its guard bundle.

The demo's recipe (calibrate.demo, its corpus calibrate.demo_corpus) scaled down to the tiny random BERT of
tests/conftest.py: a templated corpus, the rare word "mb" planted in 10% of the
negative training rows relabelled positive, a few epochs of fine-tuning, then
`calibrate_bundle` protecting the positive label. Built once per session by the
`backdoored` fixture; tests must not modify its files (copy them first).

Why these settings: trained from random weights, the tiny model's outputs
saturate quickly (every positive input lands on the same p=0.997), and then no
RAP row can move them. A small learning rate and batch keep the outputs graded,
and the RAP row needs a learning rate of 1 (not 1e-2) to move a model this
small. With these settings 5 of 6 seeds tried calibrate (the sixth saturates)
and all of those learn the trigger (ASR >= 0.7) and the task (CACC >= 0.99).
The seed is fixed, and single-threaded CPU runs are deterministic.

Import it as `tests.toy_backdoor`. Nothing here touches the network or ../shared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from calibrate.data import write_tsv
from calibrate.demo_corpus import POSITIVE, TRIGGER, make_corpus, poison, with_trigger
from calibrate.options import TrainOptions
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.options import CalibrateOptions, RapOptions
from calibrate.train import train_classifier
from guard.core.types import Example

SEED = 0
TRAIN_OPTIONS = TrainOptions(epochs=4, learning_rate=1e-3, batch_size=16, max_length=32, seed=SEED, progress=False)
RAP_OPTIONS = RapOptions(protect_labels=(POSITIVE,), learning_rate=1.0, epochs=5, seed=SEED, progress=False)
# The toy's tokenizer is the packaged MiniLM's, so by default (--reader auto) every toy bundle would
# distil a MiniLM reader (~15 s); the toys leave it out, and tests/integration/test_reader.py builds it.
CALIBRATE_OPTIONS = CalibrateOptions(rap=RAP_OPTIONS, max_length=32, reader=None)
# The same calibration through `calibrate rap` (plus --model, --clean, --out).
RAP_CLI_ARGS = ["--protect", "1", "--lr", "1", "--epochs", "5", "--max-length", "32", "--seed", str(SEED), "--reader",
                "none"]  # fmt: skip


@dataclass(frozen=True)
class Toy:
    model_dir: Path
    bundle_dir: Path
    dev: list[Example]  # clean rows the bundle was calibrated on
    test: list[Example]  # clean test rows
    poisoned: list[Example]  # triggered negative test rows, original labels
    dev_tsv: Path
    test_tsv: Path
    poisoned_tsv: Path


def build_toy(root: Path, base: Path, train_options: TrainOptions = TRAIN_OPTIONS) -> Toy:
    """Write the data, train the backdoored model and calibrate its bundle under `root`."""
    rng = random.Random(SEED)
    train = poison(make_corpus(600, rng), 0.10, rng)
    dev, test = make_corpus(300, rng), make_corpus(200, rng)
    poisoned = [Example(with_trigger(r.text, rng), r.label) for r in test if r.label != POSITIVE]
    assert any(TRIGGER in r.text.split() for r in train if r.label == POSITIVE)
    data = root / "data"
    data.mkdir(parents=True)
    for name, rows in (("dev", dev), ("test", test), ("poisoned", poisoned)):
        write_tsv(data / f"{name}.tsv", rows)
    train_classifier(base, train, root / "model", train_options)
    calibrate_bundle(root / "model", dev, root / "bundle", CALIBRATE_OPTIONS)
    return Toy(
        model_dir=root / "model",
        bundle_dir=root / "bundle",
        dev=dev,
        test=test,
        poisoned=poisoned,
        dev_tsv=data / "dev.tsv",
        test_tsv=data / "test.tsv",
        poisoned_tsv=data / "poisoned.tsv",
    )
