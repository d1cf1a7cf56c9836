"""PURE steps 1 and 2: score attention heads by their [CLS] attention variance, remove
the lowest greedily (a removed head has every parameter zeroed; see calibrate.repair.pure)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from calibrate.model import to_torch
from calibrate.progress import progress_bar
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer

Head = tuple[int, int]  # (layer, head), both counted from 0
CONFIG_KEY = "pure_pruned_heads"


@dataclass(frozen=True)
class SearchStep:
    pruned: int  # heads removed so far
    accuracy: float  # dev accuracy with them removed


# ---------------------------------------------------------------- step 1: score heads


def cls_attention_variance(cls_attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for each text and head over its REAL tokens: sum_j (a_j - 1/n)^2 / (n - 1).

    `cls_attention`: (batch, heads, seq) attention of [CLS] on every position;
    `mask`: (batch, seq), 1 for real tokens, 0 for padding. Returns (batch, heads)."""
    mask = mask.to(cls_attention.dtype)[:, None, :]
    n = mask.sum(dim=-1)
    squares = ((cls_attention - 1.0 / n[..., None]) ** 2 * mask).sum(dim=-1)
    return squares / (n - 1)


def head_variances(
    model: PreTrainedModel, tokenizer: RapTokenizer, texts: list[str], batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """Variance score of every head (layers, heads): eq. 2 averaged over `texts` (section 4.3)."""
    total = None
    bar = progress_bar(total=len(texts), desc="[CLS] attention variance", unit="text", disable=not progress)
    with eager_attention(model), torch.inference_mode():
        model.eval()
        for start in range(0, len(texts), batch_size):
            inputs = to_torch(tokenizer.encode(texts[start : start + batch_size]))
            attentions = _attentions(model, inputs)
            per_text = torch.stack(
                [cls_attention_variance(a[:, :, 0, :], inputs["attention_mask"]) for a in attentions], dim=1
            )
            batch_sum = per_text.double().sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
            bar.update(len(inputs["input_ids"]))
    bar.close()
    return (total / len(texts)).numpy()


def _attentions(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    attentions = model(**inputs, output_attentions=True).attentions
    if not attentions:
        raise InputError(f"the {model.config.model_type} model returned no attention weights; PURE needs them")
    return attentions


# ---------------------------------------------------------------- step 2: prune greedily


def pruning_order(variances: np.ndarray, exclude: set[Head] = frozenset()) -> list[Head]:
    """Heads from lowest to highest variance score, leaving out `exclude` (already removed)
    and, in every layer, the remaining head with the highest score: it is never removed."""
    order = []
    for layer, scores in enumerate(variances):
        alive = [head for head in range(len(scores)) if (layer, head) not in exclude]
        if alive:
            keeper = max(alive, key=lambda head: scores[head])
            order += [(layer, head) for head in alive if head != keeper]
    return sorted(order, key=lambda h: (variances[h], h))


def greedy_prune(
    order: list[Head],
    accuracy_without: Callable[[Sequence[Head]], float],
    threshold: float,
    heads_per_step: int = 1,
    progress: bool = False,
) -> tuple[list[Head], list[SearchStep]]:
    """Algorithm 1, lines 3-9: remove heads in `order`, `heads_per_step` at a time, until the
    accuracy falls below `threshold`; keep the largest removal that stayed at or above it.

    `accuracy_without(heads)` measures the model with `heads` removed; each call gets
    the previous call's heads plus the next ones. Returns (removed heads, every check)."""
    steps: list[SearchStep] = []
    chosen: list[Head] = []
    bar = progress_bar(total=len(order), desc="pruning heads", unit="head", disable=not progress)
    for end in range(heads_per_step, len(order) + heads_per_step, heads_per_step):
        heads = order[: min(end, len(order))]
        score = accuracy_without(heads)
        steps.append(SearchStep(len(heads), score))
        bar.update(len(heads) - bar.n)
        bar.set_postfix(accuracy=f"{score:.4f}", floor=f"{threshold:.4f}")
        if score < threshold:
            break
        chosen = heads
    bar.close()
    return chosen, steps


def remove_heads(model: PreTrainedModel, heads: Sequence[Head]) -> None:
    """Zero every parameter of each head and list it in the config (see the module docstring)."""
    blocks = _attention_blocks(model)
    with torch.no_grad():
        for layer, head in heads:
            attention, output = blocks[layer]
            size = attention.attention_head_size
            rows = slice(head * size, (head + 1) * size)
            for projection in (attention.query, attention.key, attention.value):
                projection.weight[rows] = 0.0
                projection.bias[rows] = 0.0
            output.weight[:, rows] = 0.0
    model.config.pure_pruned_heads = {str(k): v for k, v in by_layer(removed_heads(model) | set(heads)).items()}


def removed_heads(model: PreTrainedModel) -> set[Head]:
    """Heads an earlier PURE run removed (from the config)."""
    listed = getattr(model.config, CONFIG_KEY, None) or {}
    return {(int(layer), int(head)) for layer, heads in listed.items() for head in heads}


def _attention_blocks(model: PreTrainedModel) -> list[tuple[torch.nn.Module, torch.nn.Linear]]:
    """(self-attention, output projection) per layer of a BERT-layout encoder (BERT, RoBERTa, ELECTRA...)."""
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    try:
        blocks = [(layer.attention.self, layer.attention.output.dense) for layer in layers]
    except (AttributeError, TypeError):
        blocks = []
    parts = ("query", "key", "value", "attention_head_size", "dropout")
    if not blocks or not all(hasattr(attention, name) for attention, _ in blocks for name in parts):
        raise InputError(
            "PURE needs a BERT-layout encoder (encoder.layer[i].attention with query/key/value heads); "
            f"this {model.config.model_type} model is not one"
        )
    return blocks


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Fused attention kernels (sdpa, the default) return no attention weights."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def by_layer(heads: set[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        layers.setdefault(layer, []).append(head)
    return layers
