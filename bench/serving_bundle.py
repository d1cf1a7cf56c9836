"""The serving benchmark's bundle: an existing bundle plus every graph variant, and is int8 good enough?

    python -m bench.serving_bundle --bundle bench/.cache/bundles/badnet-sl-prob \\
        --model bench/.cache/models/badnet-sl --data ../shared/data/sst2 --attack badnet-sl

The source bundle is copied, never modified. Its fp32 thresholds are kept: the torch
model is rebuilt from `--model` plus the bundle's RAP row (read from model.onnx, checked
for parity), then the same code `calibrate rap` runs adds the graphs the bundle lacks:
model.int8.onnx, model.opt.onnx (exported again with eager attention, the pattern the
fusions match) and model.int8.opt.onnx, each int8 graph with thresholds fitted on its own
deltas over the bundle's held-out rows (its calibration split of SST-2 dev, reproduced
from the seed). hf/ is written too, for the naive server. Then FRR and FAR on SST-2 test
and its poisoned copy for every graph, and the int8 recommendation at the default FRR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.attacks.recipes import TARGET, load_recipes
from calibrate.data import load_examples
from calibrate.model import copy_tokenizer_files, label_names, load_classifier, predict_probs
from calibrate.rap.evaluate import evaluate_bundle
from calibrate.rap.export import INT8_RECIPE, export_onnx, quantize_int8
from calibrate.rap.optimize import INT8_MARGIN, add_optimized_graphs, eager_attention, int8_recommendation
from calibrate.rap.options import FRR_TARGETS, RapOptions
from calibrate.rap.perturbation import split_rows
from calibrate.rap.refit import HeldOut
from guard.core import rap
from guard.core.backends.base import INT8_GRAPH, PARITY_TOLERANCE
from guard.core.backends.onnx import OnnxBackend
from guard.core.bundle import Int8Variant, load_bundle, read_manifest, save_bundle
from guard.core.detection import Detection

BACKENDS = ("onnx", "onnx-opt", "onnx-int8", "onnx-int8-opt")
SUMMARY = "serving-variants.json"


def build(src: Path, model_dir: Path, data: Path, attack: str, out: Path) -> dict:
    """Write the derived bundle to `out` (once; later calls return its summary)."""
    if (out / SUMMARY).is_file():
        load_bundle(out)
        return json.loads((out / SUMMARY).read_text())
    manifest = load_bundle(src).manifest
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    (out / "manifest.json").unlink()
    bundle_tokenizer = load_bundle(src).tokenizer()
    model = _rebuild(model_dir, out / "model.onnx")
    texts = _held_out(load_examples(data / "dev.tsv"), manifest.statistic)
    protect = [p.label for p in manifest.protect]
    labels = label_names(model)
    parity = _logits_parity(model, bundle_tokenizer, out / "model.onnx", texts[:64])
    floors = Detection.of(load_bundle(src), ("rap",)).floors
    fit = HeldOut(bundle_tokenizer, texts, protect, labels, manifest.statistic, FRR_TARGETS, floors=floors)
    quantize_int8(out / "model.onnx", out / INT8_GRAPH)
    int8_protect, agreement = fit.fit(out / INT8_GRAPH, out / "model.onnx")
    int8 = Int8Variant(graph=INT8_GRAPH, quantization=INT8_RECIPE, protect=int8_protect, agreement=agreement)
    with tempfile.TemporaryDirectory() as tmp:
        with eager_attention(model):
            export_onnx(model, bundle_tokenizer, Path(tmp) / "eager.onnx")
        optimized = add_optimized_graphs(out, Path(tmp) / "eager.onnx", model, bundle_tokenizer, texts[:64], fit.fit)
    (out / "hf").mkdir(exist_ok=True)
    model.save_pretrained(str(out / "hf"))
    copy_tokenizer_files(model_dir, out / "hf")
    save_bundle(out, manifest.model_copy(update={"int8": int8, "optimized": optimized}))
    summary = {
        "source_bundle": str(src),
        "rebuilt_parity_max_prob_diff": parity,
        "held_out_rows": len(texts),
        "fused_operators": optimized.fused_operators,
        "optimized_parity_max_prob_diff": optimized.parity_max_prob_diff,
        "agreement_with_fp32": {"onnx-int8": agreement, "onnx-int8-opt": optimized.int8_agreement},
        "evaluation": _evaluate(out, data, attack, manifest.default_frr),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _rebuild(model_dir: Path, graph: Path):
    """The torch classifier with the bundle's RAP row: `model_dir` weights + the graph's last embedding row."""
    import onnx
    import torch
    from onnx import numpy_helper

    weights = next(
        numpy_helper.to_array(t)
        for t in onnx.load(str(graph)).graph.initializer
        if t.name.endswith("word_embeddings.weight")
    )
    model = load_classifier(model_dir).eval()
    model.resize_token_embeddings(weights.shape[0], mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1] = torch.from_numpy(weights[-1].copy())
    return model


def _logits_parity(model, tokenizer, graph: Path, texts: list[str]) -> float:
    """Max |p_onnx - p_torch| of the rebuilt model on the source graph, both passes (its only output
    may be logits: graphs exported before other outputs existed)."""
    backend = OnnxBackend(graph)
    worst = 0.0
    for perturbed in (False, True):
        encode = tokenizer.encode_perturbed if perturbed else tokenizer.encode
        onnx_p = rap.softmax(backend.infer(encode(texts)))
        worst = max(worst, float(np.abs(predict_probs(model, tokenizer, texts, perturbed=perturbed) - onnx_p).max()))
    backend.close()
    if worst > PARITY_TOLERANCE:
        raise RuntimeError(f"the rebuilt model disagrees with {graph}: {worst:.2e} > {PARITY_TOLERANCE:g}")
    return worst


def _held_out(dev: list, statistic: str) -> list[str]:
    """The calibration split `calibrate rap` held out of RAP training (calibrate.rap.perturbation._split)."""
    _train, held = split_rows(dev, RapOptions(protect_labels=(TARGET,), statistic=statistic))
    return [r.text for r in held]


def _evaluate(bundle: Path, data: Path, attack: str, frr: float) -> dict:
    test = load_examples(data / "test.tsv")
    poisoned = load_recipes(data)[attack].poison_test(test)
    out = {}
    for backend in BACKENDS:
        evaluation = evaluate_bundle(bundle, test, {attack: poisoned}, target=TARGET, backend=backend)
        row = next(r for r in evaluation.rows if np.isclose(r["frr_target"], frr))
        out[backend] = {"frr_target": frr, "cacc": row["cacc"], "frr": row["test_frr"], "far": row["test_far"],
                        "asr": row["asr"]}  # fmt: skip
    fp32 = out["onnx"]
    out["int8_verdict"] = {b: int8_recommendation(fp32, out[b], INT8_MARGIN) for b in ("onnx-int8", "onnx-int8-opt")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="the source bundle (read only)")
    p.add_argument("--model", type=Path, required=True, help="the HF model dir the bundle was calibrated from")
    p.add_argument("--data", type=Path, required=True, help="the sst2 folder (dev.tsv, test.tsv)")
    p.add_argument("--attack", default="badnet-sl", help="the attack recipe the model carries")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    read_manifest(args.bundle)
    print(json.dumps(build(args.bundle, args.model, args.data, args.attack, args.out), indent=2))


if __name__ == "__main__":
    main()
