"""Optimised serving graphs: ONNX Runtime's transformer fusions, saved in the bundle.

    exported model.onnx --(onnxruntime.transformers.optimizer, the family's model_type)--> model.opt.onnx
    model.opt.onnx      --(dynamic int8, MatMul weights only, per channel)-------> model.int8.opt.onnx

The optimiser fuses embeddings + LayerNorm, attention (MultiHeadAttention, so that the
Q/K/V projections stay plain MatMuls the int8 recipe quantises), bias + GELU and
residual + LayerNorm. It keeps every output of the exported graph (logits, and any
other output a detector adds): `optimize_graph` refuses a result whose outputs differ.

The optimiser model type is the family's (guard.core.family: `bert` for BERT, RoBERTa,
XLM-R, ELECTRA and DistilBERT); a family whose attention the optimiser cannot fuse
(DeBERTa's disentangled attention, ModernBERT's rotary fused QKV, ALBERT's shared
layers) gets no optimised graph, and the log says why: its model.onnx is served.

Traps:
- The fusions match the *eager* attention pattern. A graph exported with PyTorch's
  SDPA attention (the transformers 5 default) keeps its unfused attention: export
  under `eager_attention(model)`; the report lists which operators were fused.
- The int8 quantiser cannot infer types through the fused com.microsoft operators
  unless it is told that unknown tensors are float (`DefaultTensorType`).
- Thresholds: the fp32 optimised graph is parity-checked against torch within
  PARITY_TOLERANCE and so shares the fp32 thresholds; the int8 optimised graph moves
  deltas as int8 does, so it gets thresholds fitted on its own held-out deltas.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from transformers import PreTrainedModel

from calibrate.model import model_family
from calibrate.rap.export import check_parity
from guard.core.backends.base import INT8_OPT_GRAPH, OPT_GRAPH
from guard.core.bundle import OptimizedGraphs, ProtectedLabel
from guard.core.errors import GuardError
from guard.core.tokenizer import RapTokenizer

log = logging.getLogger(__name__)

OPT_RECIPE = "onnxruntime.transformers.optimizer (model_type {}, MultiHeadAttention fusion), opset as exported"
INT8_OPT_RECIPE = "dynamic int8 of model.opt.onnx, MatMul weights only, per-channel (onnxruntime.quantization)"


class OptimizeError(GuardError):
    """The optimiser changed what the graph computes or outputs."""


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Trace with eager attention, whose pattern ONNX Runtime's fusions recognise (SDPA's is not)."""
    before = getattr(model.config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None or before in (None, "eager"):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(before)


def optimize_graph(src: Path, dst: Path, num_heads: int, hidden_size: int, model_type: str = "bert") -> dict[str, int]:
    """Fuse `src` into `dst` (optimiser `model_type`); return the fused operator counts. Every output is kept."""
    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    options.use_multi_head_attention = True  # Q, K, V stay MatMuls: the int8 recipe quantises them
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(
            str(src),
            model_type=model_type,
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=options,
            opt_level=0,  # python fusions only; the session applies ORT's own (portable) optimisations at load
        )
        model.save_model_to_file(str(dst))
    before = _outputs(onnx.load(str(src), load_external_data=False))
    after = _outputs(onnx.load(str(dst), load_external_data=False))
    if before != after:
        raise OptimizeError(f"the optimised graph's outputs {after} differ from the exported graph's {before}")
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def quantize_int8_fused(src: Path, dst: Path) -> None:
    """The bundle's int8 recipe (MatMul weights, per channel) on a graph with fused operators."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def add_optimized_graphs(
    folder: Path,
    source: Path,
    model: PreTrainedModel,
    tokenizer: RapTokenizer,
    parity_texts: Sequence[str],
    int8_fit: Refit | None = None,
) -> OptimizedGraphs | None:
    """Write model.opt.onnx (+ model.int8.opt.onnx with its own thresholds when `int8_fit`) into `folder`.

    `source` is the exported graph to optimise (eager attention for the full set of fusions).
    `int8_fit(graph, reference)` fits the int8 graph's thresholds and its agreement with the fp32
    reference (`calibrate.rap.refit.HeldOut(...).fit`, or the caller's own when it fits more than RAP's).
    None, with the reason logged, for a family the optimiser has no fusions for.
    """
    family = model_family(model)
    if family.optimizer is None:
        log.warning("no optimised graph for %s: %s", family.name, family.optimizer_skipped)
        return None
    heads, hidden = _heads_and_hidden(model.config)
    fused = optimize_graph(source, folder / OPT_GRAPH, heads, hidden, family.optimizer)
    parity = check_parity(model, tokenizer, folder / OPT_GRAPH, list(parity_texts))
    log.info("optimised graph: fused %s, parity %.2e", fused, parity)
    if "MultiHeadAttention" not in fused and "Attention" not in fused:
        log.warning("the optimiser fused no attention (export under eager_attention for the full set of fusions)")
    recipe = OPT_RECIPE.format(family.optimizer)
    graphs = OptimizedGraphs(graph=OPT_GRAPH, recipe=recipe, fused_operators=fused, parity_max_prob_diff=parity)
    if int8_fit is None:
        return graphs
    quantize_int8_fused(folder / OPT_GRAPH, folder / INT8_OPT_GRAPH)
    protect, agreement = int8_fit(folder / INT8_OPT_GRAPH, folder / OPT_GRAPH)
    return graphs.model_copy(
        update={"int8_graph": INT8_OPT_GRAPH, "int8_recipe": INT8_OPT_RECIPE, "int8_protect": protect,
                "int8_agreement": agreement}
    )  # fmt: skip


Refit = Callable[[Path, Path], tuple[list[ProtectedLabel], float]]


def _heads_and_hidden(config) -> tuple[int, int]:
    """Attention heads and hidden size (DistilBERT's config names them n_heads and dim)."""
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    hidden = getattr(config, "hidden_size", None) or config.dim
    return int(heads), int(hidden)


def report_entry(optimized: OptimizedGraphs | None) -> dict | None:
    """What report.json says about the optimised graphs."""
    if optimized is None:
        return None
    thresholds = {p.name: p.thresholds for p in optimized.int8_protect or []}
    return optimized.model_dump(exclude={"int8_protect"}) | {"int8_thresholds": thresholds}


# ------------------------------------------------------------------ is int8 good enough?

INT8_MARGIN = 0.005  # FAR and FRR may each be at most 0.5 points worse than fp32's


def int8_recommendation(fp32: dict, int8: dict, margin: float = INT8_MARGIN) -> dict:
    """Compare {frr, far} (shares) of fp32 and int8, each at its own thresholds, at one FRR target."""
    worse_far = int8["far"] - fp32["far"]
    worse_frr = int8["frr"] - fp32["frr"]
    ok = worse_far <= margin and worse_frr <= margin
    reason = (
        f"int8 FAR {int8['far']:.2%} vs fp32 {fp32['far']:.2%} ({worse_far:+.2%}), "
        f"FRR {int8['frr']:.2%} vs {fp32['frr']:.2%} ({worse_frr:+.2%}); margin {margin:.1%} each"
    )
    return {"recommended": ok, "margin": margin, "reason": ("within the margin: " if ok else "outside: ") + reason}


def _outputs(model) -> list[str]:
    return [o.name for o in model.graph.output]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The optimiser and the quantiser log INFO lines per tensor on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
