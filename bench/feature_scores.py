"""Which one-pass feature score to keep: DAN (the guard's) vs activation bounds (BadActs), side by side.

    python -m bench.feature_scores --data ../shared/data/sst2 --attacks badnet-sl syntactic style
    python -m bench.feature_scores --data ../shared/data/offenseval --attacks badnet-sl syntactic

Every score reads the same input: pass 1's [CLS] vector of every layer, as the bundle's graph
exports it (calibrate.model.predict_with_features). Per attack model (bench.models, cached), dev is
split once (seed 13): one half fits each score, the other half gives its conformal threshold at each
FRR target (guard.core.thresholds); rates on test (clean rows, and every non-target row triggered),
counting only inputs the model predicts as the target label, as in the detection matrix.

- dan: the guard's feature score (guard.core.features): per-layer Mahalanobis distance to the
  predicted label's clean mean under a shrunk shared covariance, standardised out of fold, largest
  over layers (DAN, Chen et al. 2022); no token scans, so the geometry alone is compared;
- dan-mean: the same distances averaged over layers instead of their maximum;
- bounds: BadActs (Yi et al. 2024): each neuron's clean interval [mean - k std, mean + k std] per
  predicted label; the score is the share of neurons outside it (k = 2), or the mean excess over
  k = 3 standard deviations (`bounds-excess`).

`--inputs attention` scores another one-pass input with the same scores (rows `attn:<score>`): per
layer, each head's attention from [CLS], summarised as its entropy over the real tokens, its largest
weight, and its weights on [CLS] itself and on the last token ([SEP]) (`attention_statistics`; torch,
eager attention). An attacker who keeps the [CLS] vectors clean-looking (bench/attacks/adaptive.py,
`adaptive-cls`) does not constrain where [CLS] attends.

Writes bench/results/feature_scores.{json,md}; features are cached under --cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.attacks.recipes import TARGET, load_recipes
from bench.machine import machine_info
from bench.models import build_model
from calibrate.data import load_examples
from calibrate.inversion.subject import load_subject
from calibrate.model import predict_with_features, quiet_transformers
from guard.core import features, thresholds
from guard.core.types import Example

log = logging.getLogger("bench.feature_scores")
FRR_TARGETS = (0.005, 0.01, 0.03, 0.05)
HEADLINE_FRR = 0.01
FRR_LIMIT = 0.015  # `best` is the lowest FAR among the scores whose test FRR meets the target
SPLIT_SEED = 13
MAX_LENGTH = 128  # tokens per input, as the detection matrix's bundles read them
Score = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (features, predicted labels) -> score, flag high


def fitted_scores(x: np.ndarray, predicted: np.ndarray, labels: list[int]) -> dict[str, Score]:
    """Each score, fitted on clean rows `x` (rows, layers, hidden) with the model's `predicted` labels."""
    stats = features.fit_cross_standardised(x, predicted, labels, features.DEFAULT_SHRINKAGE)

    def standardised(f: np.ndarray, p: np.ndarray) -> np.ndarray:
        return (features.layer_distances(stats, f, p) - stats.score_mean) / stats.score_std

    return {
        "dan": lambda f, p: features.scores(stats, f, p),
        "dan-mean": lambda f, p: standardised(f, p).mean(axis=1),
        "bounds": activation_bounds(x, predicted, labels, k=2.0, excess=False),
        "bounds-excess": activation_bounds(x, predicted, labels, k=3.0, excess=True),
    }


def activation_bounds(x: np.ndarray, predicted: np.ndarray, labels: list[int], k: float, excess: bool) -> Score:
    """BadActs' neuron intervals per predicted label: the share of neurons outside mean +- k std,
    or (`excess`) their mean distance beyond it, in standard deviations."""
    flat = x.reshape(len(x), -1)
    fits = {c: (flat[predicted == c].mean(axis=0), flat[predicted == c].std(axis=0) + 1e-6) for c in labels}

    def score(f: np.ndarray, p: np.ndarray) -> np.ndarray:
        f, out = f.reshape(len(f), -1), np.zeros(len(f))
        for c, (mean, std) in fits.items():
            z = np.abs(f[p == c] - mean) / std
            out[p == c] = np.maximum(z - k, 0).mean(axis=1) if excess else (z > k).mean(axis=1)
        return out

    return score


def compare(name: str, x: dict[str, np.ndarray], predicted: dict[str, np.ndarray], labels: list[int]) -> list[dict]:
    """Rows per score and FRR target. `x`/`predicted` keys: fit, held_out, test, poisoned."""
    rows = []
    for score_name, score in fitted_scores(x["fit"], predicted["fit"], labels).items():
        on = {k: score(x[k], predicted[k])[predicted[k] == TARGET] for k in ("held_out", "test", "poisoned")}
        for frr in FRR_TARGETS:
            threshold = thresholds.threshold_at_frr(on["held_out"], frr)
            rows.append(
                {
                    "attack": name,
                    "score": score_name,
                    "frr_target": frr,
                    "test_frr": float(np.mean(on["test"] > threshold)),
                    "test_far": float(np.mean(on["poisoned"] <= threshold)),
                    "auc": auc(on["test"], on["poisoned"]),
                    "held_out_rows": len(on["held_out"]),
                }
            )
    return rows


def auc(clean: np.ndarray, poisoned: np.ndarray) -> float:
    """P(a poisoned input scores above a clean one), ties half."""
    if len(clean) == 0 or len(poisoned) == 0:
        return float("nan")
    order = np.sort(clean)
    below = np.searchsorted(order, poisoned, side="left")
    ties = np.searchsorted(order, poisoned, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(clean) * len(poisoned)))


def attention_statistics(model, tokenizer, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pass-1 predicted labels and, per text, (layers, heads x 4): [CLS]'s attention entropy over the real
    tokens, its largest weight, its weight on [CLS] and on the last real token, per head."""
    import torch

    from calibrate.model import to_torch

    model.set_attn_implementation("eager")  # SDPA returns no attention weights
    predicted, stats = [], []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            inputs = to_torch(tokenizer.encode(texts[i : i + batch_size]))
            out = model(**inputs, output_attentions=True)
            predicted.append(out.logits.argmax(-1).numpy())
            cls = torch.stack([a[:, :, 0, :] for a in out.attentions], 1)  # rows, layers, heads, tokens
            real = inputs["attention_mask"][:, None, None, :].to(cls.dtype)
            entropy = -(cls * torch.log(cls.clamp_min(1e-12)) * real).sum(-1)
            last = inputs["attention_mask"].sum(1) - 1
            on_last = cls[torch.arange(len(cls)), :, :, last]
            parts = [entropy, (cls * real).amax(-1), cls[..., 0], on_last]
            stats.append(torch.stack(parts, -1).flatten(2).float().numpy())
    return np.concatenate(predicted), np.concatenate(stats)


def run(data: Path, dataset: str, attacks: list[str], cache: Path, inputs: tuple[str, ...] = ("cls",)) -> list[dict]:
    recipes = load_recipes(data)
    dev, test = load_examples(data / "dev.tsv"), load_examples(data / "test.tsv")
    order = list(range(len(dev)))
    random.Random(SPLIT_SEED).shuffle(order)
    half = len(dev) // 2
    splits = {"fit": [dev[i] for i in order[:half]], "held_out": [dev[i] for i in order[half:]], "test": test}
    labels = sorted({r.label for r in dev})
    rows = []
    for name in attacks:
        model_dir = Path(build_model(recipes[name], data, cache / "models")["dir"])
        poisoned = [r for r in recipes[name].poison_test(test) if r.label != TARGET]
        found = []
        for kind in inputs:
            suffix = "" if kind == "cls" else f".{kind}"
            path = cache / "feature_scores" / f"{name}{suffix}.npz"
            x, predicted = _features(model_dir, {**splits, "poisoned": poisoned}, path, kind)
            prefix = "" if kind == "cls" else "attn:"
            found += [{**r, "score": prefix + r["score"]} for r in compare(name, x, predicted, labels)]
        log.info("%s: %s", name, [(r["score"], r["test_far"]) for r in found if r["frr_target"] == HEADLINE_FRR])
        rows += [{"dataset": dataset, **r} for r in found]
    return rows


def _features(model_dir: Path, splits: dict[str, list[Example]], path: Path, kind: str = "cls") -> tuple[dict, dict]:
    if not path.is_file():
        subject = load_subject(model_dir, max_length=MAX_LENGTH)
        out = {}
        for key, rows in splits.items():
            texts = [r.text for r in rows]
            if kind == "attention":
                out[f"{key}_p"], out[f"{key}_x"] = attention_statistics(subject.model, subject.tokenizer, texts)
                continue
            probs, x = predict_with_features(subject.model, subject.tokenizer, texts, progress=True)
            out[f"{key}_x"], out[f"{key}_p"] = x, probs.argmax(axis=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    saved = np.load(path)
    return {k: saved[f"{k}_x"] for k in splits}, {k: saved[f"{k}_p"] for k in splits}


def write(out: Path, rows: list[dict]) -> None:
    """Merge with the rows already there for other (dataset, attack) pairs; write the JSON and the table."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "feature_scores.json"
    fresh = {(r["dataset"], r["attack"]) for r in rows}
    kept = [
        r
        for r in (json.loads(path.read_text())["rows"] if path.is_file() else [])
        if (r["dataset"], r["attack"]) not in fresh
    ]
    rows = kept + rows
    path.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n", encoding="utf-8")
    (out / "feature_scores.md").write_text(_table(rows), encoding="utf-8")


def _table(rows: list[dict]) -> str:
    scores = list(dict.fromkeys(r["score"] for r in rows))
    lines = [
        "# One-pass feature scores: DAN (the guard's) vs activation bounds (BadActs), on [CLS] and on attention",
        "",
        "Same pooled [CLS] features per layer (`attn:` rows: [CLS]'s attention statistics per layer and head,"
        " bench/feature_scores.py); fitted on half of dev, conformal threshold at "
        f"{HEADLINE_FRR:.0%} FRR on the other half;",
        "test FAR (FRR) over inputs the model predicts as the target; AUC over the same inputs.",
        "`bounds / dan`: the FAR ratio of BadActs' share of neurons out of bounds to DAN's (above 1: it lets",
        f"more through); `best`: the lowest FAR among the scores with test FRR <= {FRR_LIMIT:.1%}.",
        "bench/feature_scores.py.",
        "",
        "| dataset | attack | " + " | ".join(f"{s}: FAR (FRR) | {s}: AUC" for s in scores) + " | bounds / dan | best |",
        "|---|---|" + "---|---|" * len(scores) + "---|---|",
    ]
    headline = [r for r in rows if r["frr_target"] == HEADLINE_FRR]
    for dataset, attack in dict.fromkeys((r["dataset"], r["attack"]) for r in headline):
        by = {r["score"]: r for r in headline if (r["dataset"], r["attack"]) == (dataset, attack)}
        cells = [f"{by[s]['test_far']:.1%} ({by[s]['test_frr']:.1%}) | {by[s]['auc']:.3f}" if s in by else "– | –"
                 for s in scores]  # fmt: skip
        within = [r for r in by.values() if r["test_frr"] <= FRR_LIMIT]
        best = min(within, key=lambda r: (r["test_far"], -r["auc"]))["score"] if within else "none"
        if "bounds" in by and "dan" in by:
            far = by["dan"]["test_far"]
            ratio = f"{by['bounds']['test_far'] / far:.2f}" if far else "inf"
        else:
            ratio = "–"
        lines.append(f"| {dataset} | {attack} | " + " | ".join(cells) + f" | {ratio} | {best} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset folder (train/dev/test.tsv, poison/)")
    p.add_argument("--dataset", help="its name in the rows (default: the folder's name)")
    p.add_argument("--attacks", nargs="+", default=["badnet-sl", "syntactic", "style"])
    p.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="models and features")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--inputs", nargs="+", choices=("cls", "attention"), default=["cls"],
                   help="what the scores read: [CLS] vectors (the guard's input), [CLS]'s attention")  # fmt: skip
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_transformers()
    dataset = args.dataset or args.data.name
    cache = args.cache if dataset == "sst2" else args.cache / dataset
    write(args.out, run(args.data, dataset, args.attacks, cache, tuple(args.inputs)))


if __name__ == "__main__":
    main()
