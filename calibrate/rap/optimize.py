"""Optimised serving graphs: ONNX Runtime's transformer fusions, saved in the bundle.

    exported model.onnx --(onnxruntime.transformers.optimizer, model_type bert)--> model.opt.onnx
    model.opt.onnx      --(dynamic int8, MatMul weights only, per channel)-------> model.int8.opt.onnx

The optimiser fuses embeddings + LayerNorm, attention (MultiHeadAttention, so that the
Q/K/V projections stay plain MatMuls the int8 recipe quantises), bias + GELU and
residual + LayerNorm. It keeps every output of the exported graph (logits, and any
other output a detector adds): `optimize_graph` refuses a result whose outputs differ.

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

import numpy as np
from transformers import PreTrainedModel

from calibrate.rap.export import check_parity
from guard.core import rap
from guard.core.backends.base import INT8_OPT_GRAPH, OPT_GRAPH
from guard.core.backends.onnx import OnnxBackend
from guard.core.bundle import OptimizedGraphs, ProtectedLabel
from guard.core.checker import Checker
from guard.core.errors import GuardError, InputError
from guard.core.tokenizer import RapTokenizer

log = logging.getLogger(__name__)

OPT_RECIPE = "onnxruntime.transformers.optimizer (model_type bert, MultiHeadAttention fusion), opset as exported"
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


def optimize_graph(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse `src` into `dst`; return the fused operator counts. Every output of `src` is kept."""
    import onnx
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.use_multi_head_attention = True  # Q, K, V stay MatMuls: the int8 recipe quantises them
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(
            str(src),
            model_type="bert",
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
) -> OptimizedGraphs:
    """Write model.opt.onnx (+ model.int8.opt.onnx with its own thresholds when `int8_fit`) into `folder`.

    `source` is the exported graph to optimise (eager attention for the full set of fusions).
    `int8_fit(graph, reference)` fits the int8 graph's thresholds and its agreement with the fp32
    reference (`ThresholdFit(...).fit`, or the caller's own when it fits more than RAP's).
    """
    config = model.config
    fused = optimize_graph(source, folder / OPT_GRAPH, config.num_attention_heads, config.hidden_size)
    parity = check_parity(model, tokenizer, folder / OPT_GRAPH, list(parity_texts))
    log.info("optimised graph: fused %s, parity %.2e", fused, parity)
    if "MultiHeadAttention" not in fused and "Attention" not in fused:
        log.warning("the optimiser fused no attention (export under eager_attention for the full set of fusions)")
    graphs = OptimizedGraphs(graph=OPT_GRAPH, recipe=OPT_RECIPE, fused_operators=fused, parity_max_prob_diff=parity)
    if int8_fit is None:
        return graphs
    quantize_int8_fused(folder / OPT_GRAPH, folder / INT8_OPT_GRAPH)
    protect, agreement = int8_fit(folder / INT8_OPT_GRAPH, folder / OPT_GRAPH)
    return graphs.model_copy(
        update={"int8_graph": INT8_OPT_GRAPH, "int8_recipe": INT8_OPT_RECIPE, "int8_protect": protect,
                "int8_agreement": agreement}
    )  # fmt: skip


Refit = Callable[[Path, Path], tuple[list[ProtectedLabel], float]]


class ThresholdFit:
    """Fit per-label thresholds on a graph's own deltas over the held-out clean rows."""

    def __init__(
        self,
        tokenizer: RapTokenizer,
        texts: Sequence[str],
        protect: Sequence[int],
        labels: Sequence[str],
        statistic: rap.Statistic,
        frr_targets: Sequence[float],
    ) -> None:
        self.tokenizer, self.texts, self.protect = tokenizer, list(texts), list(protect)
        self.labels, self.statistic, self.frr_targets = list(labels), statistic, tuple(frr_targets)

    def fit(self, graph: Path, reference: Path) -> tuple[list[ProtectedLabel], float]:
        """Thresholds of `graph`, and the share of rows it predicts as `reference` does."""
        scores = self._scores(graph)
        predicted, deltas = scores.probs.argmax(axis=1), scores.deltas()
        out = []
        for label in self.protect:
            label_deltas = deltas[(predicted == label) & ~np.isnan(deltas)]
            if len(label_deltas) == 0:
                raise InputError(f"{graph.name} never predicts protect label {label} on the held-out rows")
            out.append(
                ProtectedLabel(
                    label=label,
                    name=self.labels[label],
                    thresholds={f"{frr:g}": rap.threshold_at_frr(label_deltas, frr) for frr in self.frr_targets},
                    percentiles=rap.percentile_table(label_deltas),
                    calibration_rows=len(label_deltas),
                )
            )
        agreement = float(np.mean(predicted == self._scores(reference).probs.argmax(axis=1)))
        return out, agreement

    def _scores(self, graph: Path):
        backend = OnnxBackend(graph)
        try:
            return Checker(self.tokenizer, backend, statistic=self.statistic).score(self.texts, self.protect)
        finally:
            backend.close()


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
