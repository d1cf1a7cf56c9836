"""PURE (Zhao et al., ICML 2024): head pruning, then fine-tuning with attention normalisation.

Backdoor triggers hijack the [CLS] attention of a few heads ("attention focus
drifting", section 4.2); on clean text those heads attend almost uniformly, so
their [CLS] attention variance (eq. 2) is low (section 4.3). Algorithm 1:

1. score each head by its mean [CLS] attention variance on clean validation text;
2. greedily remove the lowest-scoring heads, step by step, until validation
   accuracy falls below a threshold. The paper's threshold is an absolute 85%
   (section 6.2), which means nothing on another task; here it is the unpruned
   accuracy minus `max_accuracy_drop`. One head per layer always stays;
3. fine-tune with cross-entropy plus mu * sum_l lambda_l * sum_h ||A_h^l[CLS]||_2
   (eq. 3), lambda_l = -log2(mean variance of the layer's remaining heads),
   min-max normalised to [0, 1] (section 6.2).

Two departures from public code, both deliberate. The variance counts real tokens
only: padding positions get zero attention, and including them changes both the
mean 1/n and the n - 1 of eq. 2, which ranks heads by text length rather than by
focus. And the attention penalty is taken with attention dropout off, because
transformers returns the attention weights after dropout in training mode.

transformers 5 has no `prune_heads`, and a checkpoint whose layers hold different
numbers of heads does not load into a standard model class. A head is therefore
removed by zeroing all its parameters (its query, key and value rows and biases, its
columns of the attention output projection): the model computes exactly what the
structurally pruned one would, stays a normal HF model directory (ONNX export and
`calibrate rap` take it as it is), and the head stays zero under any later
fine-tuning, since every gradient reaching it is a product with those zeros. The
removed heads are listed in the config as `pure_pruned_heads` (not `pruned_heads`,
which transformers 4 would try to prune structurally at load time).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from calibrate.data import load_examples
from calibrate.model import copy_tokenizer_files, flush_denormal, load_classifier, require_support, to_torch
from calibrate.record import prepare_out_dir, write_record
from calibrate.repair.heads import (
    Head,
    SearchStep,
    _attention_blocks,
    _attentions,
    by_layer,
    eager_attention,
    greedy_prune,
    head_variances,
    pruning_order,
    remove_heads,
    removed_heads,
)
from calibrate.repair.options import PruneJob, PruneOptions
from calibrate.train import LossFn, accuracy, check_labels, fit, load_tokenizer, seed_everything
from guard.core.family import PURE
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example

log = logging.getLogger(__name__)

MIN_VARIANCE = 1e-12  # keeps log2 finite for a layer whose heads all attend uniformly


@dataclass
class PruneResult:
    out_dir: Path
    baseline_accuracy: float  # dev accuracy of the suspect model
    accuracy_threshold: float  # baseline - max_accuracy_drop
    variances: np.ndarray  # (layers, heads): mean [CLS] attention variance on dev text (eq. 2)
    pruned_heads: dict[int, list[int]]  # layer -> removed heads (earlier removals included)
    search: list[SearchStep]  # every accuracy check; the last one may be the step that went below
    layer_coefficients: list[float]  # lambda_l of eq. 3, normalised
    pruned_accuracy: float  # dev accuracy after pruning, before fine-tuning
    dev_accuracy: float  # dev accuracy of the repaired model
    seconds: dict[str, float] = field(default_factory=dict)


def pure_repair(
    model_dir: Path,
    train: list[Example],
    dev: list[Example],
    out_dir: Path,
    options: PruneOptions = PruneOptions(),
    force: bool = False,
) -> PruneResult:
    """Run PURE on the classifier in `model_dir`; save the repaired classifier to `out_dir`.

    `train`: clean rows for the final fine-tuning; `dev`: clean rows that score the
    heads and decide when pruning stops. Both may use any number of labels."""
    prepare_out_dir(model_dir, out_dir, force)
    started = time.perf_counter()
    model = load_classifier(model_dir)
    require_support(model, PURE)
    tokenizer = load_tokenizer(model_dir, out_dir, options.finetune.max_length)
    for rows in (train, dev):
        check_labels(model, rows)
    seed_everything(options.finetune.seed)
    with flush_denormal():
        result = _repair(model, tokenizer, train, dev, Path(out_dir), options)
    model.save_pretrained(str(out_dir))
    copy_tokenizer_files(model_dir, out_dir)
    result.seconds["total"] = round(time.perf_counter() - started, 2)
    write_record(out_dir, "pure", model_dir, _record(result, options))
    return result


def _repair(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    train: list[Example],
    dev: list[Example],
    out_dir: Path,
    options: PruneOptions,
) -> PruneResult:
    _check_model(model, tokenizer)
    clock = time.perf_counter()
    variances = head_variances(model, tokenizer, [r.text for r in dev], options.batch_size, options.progress)
    seconds = {"variance": round(time.perf_counter() - clock, 2)}

    clock = time.perf_counter()
    earlier = removed_heads(model)
    baseline = accuracy(model, tokenizer, dev)
    chosen, search = _search(model, tokenizer, dev, pruning_order(variances, earlier), baseline, options)
    remove_heads(model, chosen)
    pruned_accuracy = next((step.accuracy for step in search if step.pruned == len(chosen)), baseline)
    seconds["search"] = round(time.perf_counter() - clock, 2)

    clock = time.perf_counter()
    removed = earlier | set(chosen)
    coefficients = layer_coefficients(variances, removed)
    _normalise_attention(model, tokenizer, train, penalty_weights(coefficients, removed, variances.shape), options)
    seconds["finetune"] = round(time.perf_counter() - clock, 2)
    return PruneResult(
        out_dir=out_dir,
        baseline_accuracy=baseline,
        accuracy_threshold=baseline - options.max_accuracy_drop,
        variances=variances,
        pruned_heads=by_layer(removed),
        search=search,
        layer_coefficients=[float(c) for c in coefficients],
        pruned_accuracy=pruned_accuracy,
        dev_accuracy=accuracy(model, tokenizer, dev),
        seconds=seconds,
    )


def _check_model(model: PreTrainedModel, tokenizer: RapTokenizer) -> None:
    """Fail early, with one line, on a model PURE cannot work with."""
    _attention_blocks(model)
    with eager_attention(model), torch.inference_mode():
        model.eval()
        _attentions(model, to_torch(tokenizer.encode(["a short probe sentence"])))


def _search(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    dev: list[Example],
    order: list[Head],
    baseline: float,
    options: PruneOptions,
) -> tuple[list[Head], list[SearchStep]]:
    """Greedy search on a copy of the model, so `model` itself loses only the chosen heads."""
    work = copy.deepcopy(model)

    def accuracy_without(heads: Sequence[Head]) -> float:
        remove_heads(work, heads)
        return accuracy(work, tokenizer, dev)

    threshold = baseline - options.max_accuracy_drop
    return greedy_prune(order, accuracy_without, threshold, options.heads_per_step, options.progress)


# ---------------------------------------------------------------- step 3: attention normalisation


def layer_coefficients(variances: np.ndarray, removed: set[Head]) -> np.ndarray:
    """lambda_l = -log2(mean variance of layer l's remaining heads) (section 5.2), min-max
    normalised to [0, 1] (section 6.2): layers whose remaining heads focus least on clean
    text are normalised hardest. All layers equal: every coefficient is 1."""
    means = np.array(
        [
            np.mean([v for head, v in enumerate(scores) if (layer, head) not in removed])
            for layer, scores in enumerate(variances)
        ]
    )
    raw = -np.log2(np.maximum(means, MIN_VARIANCE))
    spread = raw.max() - raw.min()
    return (raw - raw.min()) / spread if spread > 0 else np.ones_like(raw)


def attention_norm_penalty(
    attentions: Sequence[torch.Tensor], mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The regulariser of eq. 3: sum_l sum_h weights[l, h] * ||A_h^l[CLS]||_2, mean over the batch.

    `attentions`: per layer (batch, heads, seq, seq); `mask`: (batch, seq); `weights`:
    (layers, heads), lambda_l for kept heads and 0 for removed ones. Each norm is at
    least 1/sqrt(n) for n real tokens, with equality at uniform attention."""
    mask = mask.to(attentions[0].dtype)[:, None, :]
    norms = torch.stack([(a[:, :, 0, :] * mask).norm(dim=-1) for a in attentions], dim=1)
    return (norms * weights.to(norms.dtype)).sum(dim=(1, 2)).mean()


def penalty_weights(coefficients: np.ndarray, removed: set[Head], shape: tuple[int, int]) -> torch.Tensor:
    """(layers, heads): lambda_l for every kept head of layer l, 0 for removed heads."""
    weights = torch.tensor(coefficients, dtype=torch.float32)[:, None].repeat(1, shape[1])
    for layer, head in removed:
        weights[layer, head] = 0.0
    return weights


def _normalise_attention(
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    train: list[Example],
    weights: torch.Tensor,
    options: PruneOptions,
) -> None:
    """Fine-tune with eq. 3, attention dropout off (see the module docstring)."""
    finetune = replace(options.finetune, progress=options.progress)
    with _attention_dropout_off(model):
        fit(model, tokenizer, train, finetune, _penalised_loss(weights, options.mu), desc="PURE fine-tuning")


def _penalised_loss(weights: torch.Tensor, mu: float) -> LossFn:
    def loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        out = model(**inputs, labels=labels, output_attentions=True)
        return out.loss + mu * attention_norm_penalty(out.attentions, inputs["attention_mask"], weights)

    return loss


@contextmanager
def _attention_dropout_off(model: PreTrainedModel) -> Iterator[None]:
    """Eager attention, attention-probability dropout off (hidden dropout stays on)."""
    dropouts = [attention.dropout for attention, _ in _attention_blocks(model)]
    rates = [d.p for d in dropouts]
    for d in dropouts:
        d.p = 0.0
    try:
        with eager_attention(model):
            yield
    finally:
        for d, rate in zip(dropouts, rates, strict=True):
            d.p = rate


def _record(result: PruneResult, options: PruneOptions) -> dict:
    return {
        "options": asdict(options),
        "baseline_accuracy": result.baseline_accuracy,
        "accuracy_threshold": result.accuracy_threshold,
        "pruned_heads": {str(k): v for k, v in result.pruned_heads.items()},
        "pruned_count": sum(len(v) for v in result.pruned_heads.values()),
        "head_count": int(result.variances.size),
        "search": [asdict(s) for s in result.search],
        "layer_coefficients": result.layer_coefficients,
        "variances": result.variances,
        "pruned_accuracy": result.pruned_accuracy,
        "dev_accuracy": result.dev_accuracy,
        "seconds": result.seconds,
    }


def run_pure(job: PruneJob, say: Callable[[str], None] = print) -> PruneResult:
    """`calibrate prune`: PURE on the job's model and rows; print what was removed and kept."""
    train, dev = load_examples(job.data), load_examples(job.dev)
    result = pure_repair(job.model, train, dev, job.out, job.options, force=job.force)
    removed = sum(len(heads) for heads in result.pruned_heads.values())
    say(
        f"removed {removed} of {result.variances.size} heads (dev accuracy {result.baseline_accuracy:.4f} -> "
        f"{result.pruned_accuracy:.4f} pruned, floor {result.accuracy_threshold:.4f}); after attention "
        f"normalisation {result.dev_accuracy:.4f}"
    )
    say(f"saved {job.out} in {result.seconds['total']:.0f} s (record: {Path(job.out) / 'repair.json'})")
    return result
