"""Write the detection matrix: JSON rows, a markdown table, one FAR-vs-FRR panel per attack."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calibrate.report import markdown_table  # noqa: E402

COLUMNS = [
    "attack",
    "detector",
    "frr_target",
    "cacc",
    "asr",
    "dev_frr",
    "test_frr",
    "test_far",
    "residual_asr",
    "passes_per_input",
    "ms_per_input",
]
HEADLINE_FRR = 0.01
COLORS = {"rap": "tab:red", "strip": "tab:blue", "onion": "tab:green"}


def best_strip(runs: dict[str, dict]) -> dict | None:
    """STRIP's k with the lowest test FAR at 1% FRR: the RAP paper's protocol (an oracle choice, kind to STRIP)."""
    strips = [r for key, r in runs.items() if key.startswith("strip@")]
    return min(strips, key=lambda r: _at(r, HEADLINE_FRR)["test_far"], default=None)


def matrix_rows(results: dict[str, dict], costs: dict[str, float]) -> list[dict]:
    rows = []
    for attack, result in results.items():
        for run in _headline_runs(result["runs"]):
            for point in run["operating"]:
                rows.append(
                    {
                        "attack": attack,
                        "detector": run["detector"],
                        "cacc": result["cacc"],
                        "asr": result["asr"],
                        **point,
                        "passes_per_input": run["passes_per_input"],
                        "ms_per_input": costs.get(run["detector"], run["ms_per_input"]),
                        "params": run.get("params", {}),
                    }
                )
    return rows


def write_matrix(out: Path, results: dict[str, dict], costs: dict[str, float], machine: dict) -> None:
    """`costs`: online ms per input per detector (and "bare"), measured back to back."""
    out.mkdir(parents=True, exist_ok=True)
    rows = matrix_rows(results, costs)
    details = {
        a: {"recipe": r["recipe"], "train": r["train"], "strip_by_ratio": _strip_table(r["runs"])}
        for a, r in results.items()
    }
    (out / "detection_matrix.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "costs_ms": costs, "details": details}, indent=2) + "\n"
    )
    plot_matrix(out / "detection_matrix.png", results)
    (out / "detection_matrix.md").write_text(_markdown(rows, details, costs, machine))


def plot_matrix(path: Path, results: dict[str, dict]) -> None:
    fig, axes = plt.subplots(2, (len(results) + 1) // 2, figsize=(4.2 * ((len(results) + 1) // 2), 7.5), squeeze=False)
    for ax, (attack, result) in zip(axes.flat, results.items(), strict=False):
        for run in _headline_runs(result["runs"]):
            frr, far = run["curve"]
            color = COLORS[run["detector"]]
            order = sorted(range(len(frr)), key=lambda i: (frr[i], -far[i]))
            ax.plot([100 * frr[i] for i in order], [100 * far[i] for i in order], color=color, label=run["detector"])
            point = _at(run, HEADLINE_FRR)
            ax.scatter([100 * point["test_frr"]], [100 * point["test_far"]], color=color, zorder=3)
        ax.set_title(f"{attack} (ASR {result['asr']:.0%})", fontsize=10)
        ax.set_xlim(0, 10)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("test FRR (%)")
        ax.set_ylabel("test FAR (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    fig.suptitle("FAR vs FRR on SST-2 test (dots: threshold fitted on dev at 1% FRR)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _headline_runs(runs: dict[str, dict]) -> list[dict]:
    chosen = [runs[k] for k in ("rap",) if k in runs]
    if (strip := best_strip(runs)) is not None:
        chosen.append(strip)
    return chosen + [runs[k] for k in ("onion",) if k in runs]


def _at(run: dict, frr: float) -> dict:
    return next(p for p in run["operating"] if abs(p["frr_target"] - frr) < 1e-9)


def _strip_table(runs: dict[str, dict]) -> list[dict]:
    return [
        {
            "replace_ratio": r["params"]["replace_ratio"],
            **{k: _at(r, HEADLINE_FRR)[k] for k in ("test_frr", "test_far")},
        }
        for key, r in runs.items()
        if key.startswith("strip@")
    ]


def _cost_table(rows: list[dict], costs: dict[str, float]) -> str:
    passes = {r["detector"]: r["passes_per_input"] for r in rows if r["attack"] != "clean"}
    table = [{"detector": "bare model", "passes_per_input": 1.0, "ms_per_input": costs.get("bare"), "x_bare": 1.0}]
    for name, p in passes.items():
        ms = costs.get(name)
        x_bare = ms / costs["bare"] if ms is not None and costs.get("bare") else None
        table.append({"detector": name, "passes_per_input": p, "ms_per_input": ms, "x_bare": x_bare})
    return markdown_table(table, ["detector", "passes_per_input", "ms_per_input", "x_bare"])


def _markdown(rows: list[dict], details: dict, costs: dict[str, float], machine: dict) -> str:
    headline = [r for r in rows if abs(r["frr_target"] - HEADLINE_FRR) < 1e-9]
    strip_lines = [
        f"- {attack}: "
        + ", ".join(
            f"k={s['replace_ratio']:g}: FRR {s['test_frr']:.2%} FAR {s['test_far']:.2%}" for s in d["strip_by_ratio"]
        )
        for attack, d in details.items()
        if d["strip_by_ratio"]
    ]
    return (
        "# Detection matrix: RAP vs STRIP vs ONION (SST-2, packaged MiniLM)\n\n"
        "Thresholds fitted on clean SST-2 dev rows at each FRR target; rates on SST-2 test (clean rows, and every\n"
        "non-target row with the trigger). FRR/FAR count only inputs the model predicts as the target label.\n"
        "`clean` is a model without a backdoor, measured on BadNet-RW inputs: its ASR is natural flips, and its\n"
        "FRR is what the detector costs honest traffic. ![curves](detection_matrix.png)\n\n"
        "## At 1% dev FRR\n\n"
        + markdown_table(headline, COLUMNS)
        + "\n## Cost per input online (one input at a time, measured back to back on the same 200 inputs)\n\n"
        + _cost_table(rows, costs)
        + "\n## Every FRR target\n\n"
        + markdown_table(rows, COLUMNS)
        + "\n## STRIP by replace ratio k (at 1% dev FRR; the row above uses the best k per attack)\n\n"
        + "\n".join(strip_lines)
        + "\n\n"
        + _notes(machine)
    )


def _notes(machine: dict) -> str:
    return (
        "## How each detector was run\n\n"
        "- RAP: the bundle `calibrate rap` wrote (thresholds from the held-out half of dev); 2 passes per input\n"
        "  predicted as the target (1 for the others).\n"
        "- STRIP: N = 20 copies, k% of words replaced by words of dev rows of the other label; normalised entropy\n"
        "  per input; to bound its cost (21 passes per input, each k) its test rates use a random sample of the\n"
        "  test inputs (`params.test_inputs` in the JSON; all dev rows for the threshold);\n"
        "  threshold at the dev FRR; k reported per attack at its best test FAR (the RAP paper's own\n"
        "  protocol, an oracle choice that favours STRIP); all k in the section above.\n"
        "- ONION: no GPT-2 offline, so perplexities come from a word trigram Kneser-Ney model trained on SST-2's\n"
        "  clean training split plus IMDB/Yelp/Amazon review samples (bench/detectors/ngram.py). Weaker than\n"
        "  GPT-2 and much cheaper: its ms_per_input is NOT what ONION costs with GPT-2 (about words+1 BERT\n"
        "  passes, the passes_per_input column). Threshold: the 10th-99th percentile of dev suspicion scores whose\n"
        "  dev FRR is closest to the target (dev_frr shows what it reached).\n"
        "- ms_per_input: online cost, one input at a time, each detector in turn on the same 100 clean + 100\n"
        f"  poisoned inputs predicted as the target, ONNX fp32, on {machine['cpu']} x{machine['cpu_count']}.\n"
        "  passes_per_input counts model passes for an input predicted as the target (ONION: + words+1 LM passes).\n\n"
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()) + "\n"
    )
