"""The detection matrix: the guard's detectors vs RAP as published vs STRIP and ONION, per attack.

    python -m bench.detection_matrix --data ../shared/data/sst2                    # default detectors
    python -m bench.detection_matrix --data ../shared/data/sst2 --attacks badnet-sl ep --seeds 13 14 15
    python -m bench.detection_matrix --data ../shared/data/offenseval --detectors rap rap+features
    python -m bench.detection_matrix --data ../shared/data/sst2 --attacks ep --train-seeds 1 2   # retrained models

For each attack (bench/attacks/recipes.py) it trains the backdoored classifier once, calibrates
bundles on the dev set (protect label = the attack's target) for each calibration seed (the seed
draws the dev split and the RAP row's training order), then runs each detector on the test set
(clean rows, and every non-target row triggered) at the dev FRR targets 0.5/1/3/5%:
- rap-paper: RAP as published (probability band, SGD, the ladder; `calibrate rap --objective paper`);
- rap, features, rap+features: the guard's default bundle, each detector alone and both together;
- rap+features@int8: both detectors on the bundle's int8 graph with its own thresholds (a bundle
  calibrated with `--int8`);
- rap+features-noref: both detectors of a bundle calibrated WITHOUT `--reference-model` (the guard's
  bundles here use the packaged MiniLM the models were fine-tuned from);
- rap+features@redrawn: both detectors of a bundle whose RAP row starts from another word than the
  public default `rq`, a 2-3 letter word of the rarer half of the vocabulary drawn at random (issue 31:
  "a RAP row kept secret per deployment and re-drawn", against the adaptive-init attacker, who trains
  on `rq`); rows record each bundle's init word (`rap_init`);
- rap+features+reader: every detector of a bundle calibrated with `--reader` (the packaged MiniLM the
  models were fine-tuned from, distilled from the suspect on the calibration's clean rows:
  guard.core.reader); rap+features+reader@labels: the same with `--reader-objective labels` (fine-tuned
  on the rows' labels); rap+features+reader@aug4: distilled on 4 perturbed copies of each row too
  (`--reader-augment 4 --reader-epochs 3`); rap+features+reader+switch: the default reader and the
  switch detector (`--switch`: RAP's init word inserted untrained, guard.core.switch);
  rap+features+reader@texts: the reader also distilled on READER_TEXTS unlabeled texts (`--reader-texts`, 3
  epochs), a seeded sample of the dataset's train.tsv without labels, standing in for a user's own traffic
  (clean: neither dev nor test rows; the attacked model trained on a sample of the same file, poisoned);
  rap+features+reader@texts-dirty: the same with TEXTS_DIRTY of the texts triggered by the attack's own trigger
  (an attacker who also writes to the traffic sampled; `calibrate rap` screens the texts with a first reader);
  rap+features+reader@texts-trusted: the clean texts unscreened (`--reader-texts-trusted`), and
  rap+features+reader@texts-dirty-trusted: the @texts-dirty texts unscreened;
- strip, onion: the baselines (expensive: off unless asked for).

`--rap-position` is where the guard bundles' pass 2 inserts the RAP row (default: the guard's, `end`;
`front` reproduces the rows before it); rows record it (`rap_position`) and cached bundles and runs of
the end carry it in their names (badnet-sl-floored-end-s13).

`--train-seeds` measures models trained again with other seeds (row `train_seed`; none: the
attack's cached model, trained with the recipe's own seed).

The JSON's `details` say per model what the token scans of `calibrate rap --reference-model` flag:
`moved_from_base` (rows that moved far from the packaged MiniLM) and `flipped_tokens` (the flip scan
of its first calibration seed's guard bundle, calibrate/rap/token_scan.py).

Every stage is cached under --cache (models, bundles, one JSON per attack x detector x seed),
so an interrupted run resumes where it stopped; delete a file to redo that stage.
Writes bench/results/detection_matrix.{json,md,png}; rows already there for other (dataset, attack,
detector, seed) are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import random
import secrets
import time
from pathlib import Path

import numpy as np

from bench.attacks.adaptive import KNOWN_INIT_WORD
from bench.attacks.recipes import TARGET, load_recipes
from bench.detectors import strip
from bench.detectors.classifier import Classifier
from bench.detectors.ngram import TrigramLM, normalize
from bench.detectors.runs import DetectorRun, Inputs, refused_run, run_guard, run_onion, run_strip
from bench.machine import machine_info
from bench.matrix_report import write_rows
from bench.models import build_model, model_name
from calibrate.data import load_examples
from calibrate.model import default_base_model, input_embeddings, quiet_transformers
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.options import PAPER, CalibrateOptions, RapOptions
from guard.core import features, rap
from guard.core.errors import InputError
from guard.core.family import RAP_POSITIONS
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger("bench.detection_matrix")
GUARD_DETECTORS = ("rap", "features", "rap+features")
INT8_DETECTOR = "rap+features@int8"
NOREF_DETECTOR = "rap+features-noref"
REDRAWN_DETECTOR = "rap+features@redrawn"
READER_DETECTOR = "rap+features+reader"  # the reader distilled from the suspect (the default objective)
READER_LABELS_DETECTOR = "rap+features+reader@labels"  # the reader fine-tuned on the rows' labels
READER_AUGMENT_DETECTOR = "rap+features+reader@aug4"  # distilled on 4 perturbed copies of each row too, 3 epochs
SWITCH_DETECTOR = "rap+features+reader+switch"  # the default reader and the switch detector (`--switch`)
TEXTS_DETECTOR = "rap+features+reader@texts"  # the reader also distilled on unlabeled texts (`--reader-texts`)
TEXTS_DIRTY_DETECTOR = "rap+features+reader@texts-dirty"  # the same, TEXTS_DIRTY of those texts triggered
TEXTS_TRUSTED_DETECTOR = "rap+features+reader@texts-trusted"  # the clean texts, unscreened
DIRTY_TRUSTED_DETECTOR = "rap+features+reader@texts-dirty-trusted"  # the @texts-dirty texts, unscreened
READER_TEXTS = 2000  # unlabeled texts of the dataset's train.tsv (seeded sample) the @texts reader is distilled on
TEXTS_DIRTY = 0.01
READERS = (READER_DETECTOR, READER_LABELS_DETECTOR, READER_AUGMENT_DETECTOR, SWITCH_DETECTOR, TEXTS_DETECTOR,
           TEXTS_DIRTY_DETECTOR, TEXTS_TRUSTED_DETECTOR, DIRTY_TRUSTED_DETECTOR)  # fmt: skip
# per reader variant the CalibrateOptions that build it
READER_OPTIONS = {"distill": {}, "labels": {"reader_objective": "labels"},
                  "aug4": {"reader_augment": 4, "reader_epochs": 3}, "switch": {"switch": True},
                  "texts": {"reader_epochs": 3}, "texts-dirty": {"reader_epochs": 3},
                  "texts-trusted": {"reader_epochs": 3, "reader_texts_trusted": True},
                  "texts-dirty-trusted": {"reader_epochs": 3, "reader_texts_trusted": True}}  # fmt: skip
DETECTORS = ("rap-paper", *GUARD_DETECTORS, INT8_DETECTOR, NOREF_DETECTOR, REDRAWN_DETECTOR, *READERS, "strip",
             "onion")  # fmt: skip
DEFAULT_DETECTORS = ("rap-paper", *GUARD_DETECTORS)
STATISTIC_DETECTORS = (*GUARD_DETECTORS, INT8_DETECTOR, NOREF_DETECTOR, REDRAWN_DETECTOR, *READERS)
# the bundle variants: folder suffix, the `bundles` key, the graph each row reads and the detectors it flags with
BOTH, EVERY, ALL = ("rap", "features"), ("rap", "features", "reader"), ("rap", "features", "reader", "switch")
VARIANTS = {INT8_DETECTOR: ("-int8", "int8", "onnx-int8", BOTH), NOREF_DETECTOR: ("-noref", "noref", "onnx", BOTH),
            REDRAWN_DETECTOR: ("-redrawn", "redrawn", "onnx", BOTH),
            READER_DETECTOR: ("-reader-distill", "distill", "onnx", EVERY),
            READER_LABELS_DETECTOR: ("-reader", "labels", "onnx", EVERY),
            READER_AUGMENT_DETECTOR: ("-reader-aug4", "aug4", "onnx", EVERY),
            SWITCH_DETECTOR: ("-reader-switch", "switch", "onnx", ALL),
            TEXTS_DETECTOR: ("-reader-texts", "texts", "onnx", EVERY),
            TEXTS_DIRTY_DETECTOR: ("-reader-texts-dirty", "texts-dirty", "onnx", EVERY),
            TEXTS_TRUSTED_DETECTOR: ("-reader-texts-trusted", "texts-trusted", "onnx", EVERY),
            DIRTY_TRUSTED_DETECTOR: ("-reader-texts-dirty-trusted", "texts-dirty-trusted", "onnx", EVERY)}  # fmt: skip
# The RAP paper's best k per attack was 0.05 (BadNet-SL) to 0.6 (BadNet-RW, EP) on sentiment data (its
# Table 9). Two values and a test sample keep STRIP (21 passes per input) to ~5 min per attack on 2 cores.
STRIP_RATIOS = (0.05, 0.3)
STRIP_TEST_INPUTS = 300  # per side (clean, poisoned)
STATISTICS = ("floored", "perturbed")  # the guard bundle's RAP statistic: the default, and the one before it
LM_CORPORA = ("imdb/test.tsv", "yelp/test.tsv", "yelp-sentences/dev.tsv", "amazon-sentences/dev.tsv")


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    dataset = args.dataset or args.data.name
    recipes = load_recipes(args.data)
    dev, test = load_examples(args.data / "dev.tsv"), load_examples(args.data / "test.tsv")
    language_model = _LazyLM(args.data)
    cache = args.cache if dataset == "sst2" else args.cache / dataset
    rows, details = [], {}
    for name, train_seed in [(a, t) for a in args.attacks for t in args.train_seeds]:
        recipe = recipes[name]
        model = model_name(name, train_seed)
        log.info("== %s %s: model", dataset, model)
        info = build_model(recipe, args.data, cache / "models", train_seed=train_seed)
        # the clean model has no trigger: it is measured on BadNet-RW inputs (its "ASR" is natural flips)
        trigger = recipe.poison_test or recipes["badnet-rw"].poison_test
        poisoned = trigger(test)
        traffic = {TEXTS_DETECTOR: (0.0, None), TEXTS_DIRTY_DETECTOR: (TEXTS_DIRTY, trigger),
                   TEXTS_TRUSTED_DETECTOR: (0.0, None), DIRTY_TRUSTED_DETECTOR: (TEXTS_DIRTY, trigger)}  # fmt: skip
        traffic = {d: traffic_texts(args.data, *how) for d, how in traffic.items() if d in args.detectors}
        moved = _moved_from_base(Path(info["dir"]))
        details[f"{dataset}/{model}"] = {"recipe": recipe.settings, "train": info, "moved_from_base": moved}
        for seed in args.seeds:
            runs, inputs, cacc = _seed_runs(
                model, Path(info["dir"]), dev, test, poisoned, seed, cache, args, language_model, traffic
            )
            guard_bundle = cache / "bundles" / guard_bundle_name(model, seed, args.statistic, "", args.rap_position)
            details[f"{dataset}/{model}"].setdefault("flipped_tokens", _flipped(guard_bundle))
            for key, run in runs.items():
                statistic = {"statistic": args.statistic} if key in STATISTIC_DETECTORS else {}
                if key in STATISTIC_DETECTORS:
                    statistic["rap_position"] = args.rap_position
                    suffix = VARIANTS.get(key, ("",))[0]
                    variant = guard_bundle_name(model, seed, args.statistic, suffix, args.rap_position)
                    statistic["rap_init"] = _init_word(cache / "bundles" / variant)
                for point in run["operating"]:
                    row = _row(dataset, name, key, seed, cacc, inputs.asr, run, point)
                    rows.append({**row, "train_seed": train_seed, **statistic})
    write_rows(args.out, rows, details, machine_info())


@dataclasses.dataclass(frozen=True)
class Refused:
    """A bundle `calibrate rap` would not build for this model, and why."""

    reason: str


def drawn_init_word(model_dir: Path, avoid: tuple[str, ...] = ()) -> str:
    """A 2-3 letter lower-case word that is one token of the model's vocabulary, from the rarer half of such
    words (where `rq` sits in MiniLM's), drawn from the OS's entropy: a RAP row's init word no attacker knows."""
    from tokenizers import Tokenizer

    tokenizer = RapTokenizer.from_file(model_dir / "tokenizer.json", None, 16)
    found = sorted(
        (token_id, token)
        for token, token_id in Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab().items()
        if 2 <= len(token) <= 3 and token.isascii() and token.isalpha() and token.islower()
        and tokenizer.word_id(token) == token_id
    )  # fmt: skip
    pool = [token for _, token in found[len(found) // 2 :] if token not in avoid]
    return secrets.SystemRandom().choice(pool)


def _init_word(bundle: Path) -> str | None:
    """The word the bundle's RAP row started from (its manifest's; None: no such bundle)."""
    manifest = bundle / "manifest.json"
    return json.loads(manifest.read_text())["rap"]["init_word"] if manifest.is_file() else None


def _tag(statistic: str, position: str = "front") -> str:
    """Cached bundles and runs of the `perturbed` statistic, the default before `floored`, kept their names; so
    did those of a RAP row at the front, the default before `end`."""
    return ("" if statistic == "perturbed" else f"{statistic}-") + ("" if position == "front" else f"{position}-")


def guard_bundle_name(
    model: str, seed: int, statistic: str = rap.DEFAULT_STATISTIC, variant: str = "", position: str = "front"
) -> str:
    """The cached guard bundle's folder, e.g. badnet-sl-floored-end-s13 (badnet-sl-floored-s13: the row at the
    front; badnet-sl-s13: `perturbed`)."""
    return f"{model}{variant}-{_tag(statistic, position)}s{seed}"


def matrix_runs(cache: Path, model: str, seed: int, statistic: str = rap.DEFAULT_STATISTIC, position="front") -> Path:
    """Where the per-detector runs of one model and seed are cached, e.g. matrix/badnet-sl/floored-end-s13."""
    return cache / "matrix" / model / f"{_tag(statistic, position)}s{seed}"


def _seed_runs(name, model_dir, dev, test, poisoned, seed, cache, args, language_model, traffic=None):
    bundles = _seed_bundles(
        name, model_dir, dev, seed, cache, args.detectors, args.statistic, traffic, args.rap_position
    )
    inputs, cacc = _inputs(next(b for b in bundles.values() if not isinstance(b, Refused)), dev, test, poisoned)
    jobs = _detector_jobs(bundles, inputs, args, language_model)
    where = matrix_runs(cache, name, seed, args.statistic, args.rap_position)
    runs = {key: _cached(where / f"{key}.json", key, job) for key, job in jobs.items()}
    return runs, inputs, cacc


def _seed_bundles(
    name: str,
    model_dir: Path,
    dev: list[Example],
    seed: int,
    cache: Path,
    detectors,
    statistic=rap.DEFAULT_STATISTIC,
    traffic: dict[str, tuple[str, ...]] | None = None,
    position: str = "front",
) -> dict:
    """The bundles the chosen detectors read: the guard's default (RAP on `statistic`, its row at `position`), RAP
    as published, one with int8 graphs; `traffic`: per @texts detector its reader's unlabeled texts."""
    bundles, folder = {}, cache / "bundles"
    guard = RapOptions((TARGET,), seed=seed, statistic=statistic, rap_position=position)
    paper = None
    if "rap-paper" in detectors:
        options = RapOptions((TARGET,), seed=seed, **PAPER)
        paper = _paper_bundle(model_dir, dev, folder / f"{name}-paper-s{seed}", options)
    # a refused paper bundle leaves the test rows to be predicted through the guard's graph
    if set(GUARD_DETECTORS + ("strip", "onion")) & set(detectors) or isinstance(paper, Refused):
        bundles["guard"] = _bundle(
            model_dir, dev, folder / guard_bundle_name(name, seed, statistic, "", position), guard, reference=True
        )
    if paper is not None:
        bundles["paper"] = paper

    def variant(detector: str) -> Path:
        return folder / guard_bundle_name(name, seed, statistic, VARIANTS[detector][0], position)

    if NOREF_DETECTOR in detectors:
        bundles["noref"] = _bundle(model_dir, dev, variant(NOREF_DETECTOR), guard)
    if REDRAWN_DETECTOR in detectors:
        redrawn = dataclasses.replace(guard, init_word=drawn_init_word(model_dir, avoid=(KNOWN_INIT_WORD,)))
        bundles["redrawn"] = _bundle(model_dir, dev, variant(REDRAWN_DETECTOR), redrawn, reference=True)
    for detector in set(READERS) & set(detectors):
        objective = VARIANTS[detector][1]
        texts = (traffic or {}).get(detector, ())
        bundles[objective] = _bundle(
            model_dir, dev, variant(detector), guard, reference=True, reader=objective, reader_texts=texts
        )
    if INT8_DETECTOR in detectors:
        bundles["int8"] = _bundle(model_dir, dev, variant(INT8_DETECTOR), guard, int8=True, reference=True)
    return bundles


def _paper_bundle(model_dir: Path, dev: list[Example], out: Path, paper: RapOptions) -> Path | Refused:
    """RAP as published, or why it refused this model (cached beside the bundles, as they are)."""
    refusal = out.with_name(out.name + ".refused")
    if refusal.is_file():
        return Refused(refusal.read_text(encoding="utf-8"))
    try:
        return _bundle(model_dir, dev, out, paper, features=False)
    except InputError as refused:  # no positive threshold on any rung of its ladder
        log.warning("   rap-paper refused: %s", refused)
        refusal.parent.mkdir(parents=True, exist_ok=True)
        refusal.write_text(str(refused), encoding="utf-8")
        return Refused(str(refused))


def _detector_jobs(bundles: dict, inputs: Inputs, args, language_model) -> dict:
    """One job per detector row (STRIP: one per replacement ratio), each run only when not cached."""
    jobs = {}
    for detector in args.detectors:
        if detector == "rap-paper" and isinstance(bundles["paper"], Refused):
            jobs[detector] = lambda: refused_run("rap-paper", inputs, bundles["paper"].reason)
        elif detector == "rap-paper":
            jobs[detector] = lambda: _renamed(run_guard(bundles["paper"], inputs, TARGET, ("rap",)), "rap-paper")
        elif detector in GUARD_DETECTORS:
            jobs[detector] = lambda d=detector: run_guard(bundles["guard"], inputs, TARGET, tuple(d.split("+")))
        elif detector in VARIANTS:
            _, key, backend, chosen = VARIANTS[detector]
            variant = functools.partial(run_guard, bundles.get(key), inputs, TARGET, chosen, backend)
            jobs[detector] = lambda run=variant, d=detector: _renamed(run(), d)
        elif detector == "strip":
            for k in args.strip_ratios:
                options = strip.StripOptions(replace_ratio=k)
                sample = _sample(inputs, args.strip_test_inputs)
                jobs[f"strip@{k:g}"] = lambda o=options, s=sample: run_strip(bundles["guard"], s, o)
        elif detector == "onion":
            jobs["onion"] = lambda: run_onion(bundles["guard"], inputs, language_model.get(), TARGET)
    return jobs


def traffic_texts(data: Path, dirty: float = 0.0, trigger=None, count: int = READER_TEXTS, seed: int = 7) -> tuple:
    """`count` texts of the dataset's train.tsv drawn with `seed`, without their labels: the @texts reader's. A
    `dirty` share of them (the last) are other rows of other labels than the target, through `trigger`."""
    rows = load_examples(data / "train.tsv")
    random.Random(seed).shuffle(rows)
    bad = round(dirty * count)
    triggered = trigger([r for r in rows[count:] if r.label != TARGET][:bad]) if bad else []
    return tuple(r.text for r in rows[: count - len(triggered)] + triggered)


def _moved_from_base(model_dir: Path) -> list[str]:
    """The tokens `calibrate rap --reference-model packaged` flags on this model (rows that moved far)."""
    embeddings, base = input_embeddings(model_dir), input_embeddings(default_base_model())
    tokenizer = RapTokenizer.from_file(model_dir / "tokenizer.json", None, 16)
    return [tokenizer.token_text(int(t)) for t in features.moved_tokens(embeddings[: len(base)], base)]


def _flipped(bundle: Path) -> list[str] | None:
    """The tokens the guard bundle's flip scan flagged (None: no such bundle or no scan in it)."""
    report = bundle / "report.json"
    if not report.is_file():
        return None
    return (json.loads(report.read_text()).get("features") or {}).get("flipped_tokens")


def _renamed(run: DetectorRun, name: str) -> DetectorRun:
    return dataclasses.replace(run, detector=name)


def _row(dataset: str, attack: str, detector: str, seed: int, cacc: float, asr: float, run: dict, point: dict) -> dict:
    return {
        "dataset": dataset,
        "attack": attack,
        "detector": detector,
        "seed": seed,
        "frr_target": point["frr_target"],
        "cacc": cacc,
        "asr": asr,
        "dev_frr": point["dev_frr"],
        "test_frr": point["test_frr"],
        "test_far": point["test_far"],
        "residual_asr": point["residual_asr"],
        "passes_per_input": run["passes_per_input"],
        "ms_per_input": run["ms_per_input"],
        "curve": run["curve"] if point["frr_target"] == 0.01 else None,
        **({"refused": run["params"]["refused"]} if "refused" in run["params"] else {}),
    }


def _bundle(
    model_dir: Path,
    dev: list[Example],
    out: Path,
    rap: RapOptions,
    features: bool = True,
    int8: bool = False,
    reference: bool = False,
    reader: str | None = None,
    reader_texts: tuple[str, ...] = (),
) -> Path:
    """Calibrate once (cached by folder name). `reference`: the packaged MiniLM every bench model was
    fine-tuned from is the `--reference-model` (bundles cached before it was added lack that scan; the
    matrix records what it flags on each model in `moved_from_base`). `reader`: the same checkpoint is
    the `--reader` (the reader detector's clean classifier), built with READER_OPTIONS[`reader`]."""
    if not (out / "manifest.json").is_file():
        log.info("== calibrating %s", out.name)
        base = default_base_model() if reference else None
        options = CalibrateOptions(
            rap=rap, max_length=128, force=True, features=features, int8=int8, reference_model=base,
            reader=default_base_model() if reader else None, reader_texts=reader_texts,
            **READER_OPTIONS[reader or "distill"],
        )  # fmt: skip
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


def _train_seed(text: str) -> int | None:
    return None if text == "default" else int(text)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset folder (train/dev/test.tsv, poison/)")
    p.add_argument("--dataset", help="its name in the rows (default: the folder's name, e.g. sst2, offenseval)")
    p.add_argument("--attacks", nargs="+", default=["clean", "badnet-rw", "badnet-sl", "ep", "syntactic", "style"])
    p.add_argument("--detectors", nargs="+", default=list(DEFAULT_DETECTORS), choices=DETECTORS)
    p.add_argument("--seeds", nargs="+", type=int, default=[13], help="calibration seeds (dev split, RAP order)")
    p.add_argument(
        "--statistic",
        choices=STATISTICS,
        default=rap.DEFAULT_STATISTIC,
        help="the guard bundles' RAP statistic (default: the guard's; `perturbed` reproduces the rows before it)",
    )
    p.add_argument(
        "--rap-position",
        choices=RAP_POSITIONS,
        default=RapOptions.rap_position,
        help="where the guard bundles' pass 2 inserts the RAP row (default: the guard's; `front` reproduces the rows "
        "before it); RAP as published stays at the front",
    )
    p.add_argument(
        "--train-seeds", nargs="+", type=_train_seed, default=[None], help="training seeds ('default': cached model)"
    )
    p.add_argument("--strip-ratios", nargs="+", type=float, default=list(STRIP_RATIOS), help="STRIP's k values")
    p.add_argument(
        "--strip-test-inputs", type=int, default=STRIP_TEST_INPUTS, help="STRIP's test inputs per side (cost cap)"
    )
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="models, bundles, per-detector results")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p.parse_args()


if __name__ == "__main__":
    main()
