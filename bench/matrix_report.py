"""Write the detection matrix: JSON rows, a markdown table (mean and spread over seeds), FAR-vs-FRR panels."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calibrate.report import markdown_table  # noqa: E402

HEADLINE_FRR = 0.01
COLUMNS = [
    "dataset",
    "attack",
    "detector",
    "statistic",
    "rap_position",
    "train_seed",
    "seed",
    "frr_target",
    "cacc",
    "asr",
    "test_frr",
    "test_far",
]
SUMMARY = [
    "dataset",
    "attack",
    "detector",
    "statistic",
    "rap_position",
    "seeds",
    "cacc",
    "asr",
    "test_frr",
    "test_far",
    "far_range",
    "passes",
]
COLORS = {"rap-paper": "tab:gray", "rap": "tab:red", "features": "tab:blue", "rap+features": "tab:purple",
          "rap+features@int8": "tab:orange", "rap+features-noref": "tab:brown", "rap+features@redrawn": "tab:pink",
          "onion": "tab:green"}  # fmt: skip


def write_rows(out: Path, rows: list[dict], details: dict, machine: dict) -> None:
    """Merge `rows` into bench/results/detection_matrix.json: they replace the rows of the same
    (dataset, attack, detector, RAP statistic, seed); the others stay (rows of the old format, without a
    dataset, go)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "detection_matrix.json"
    kept, kept_details = [], {}
    if path.is_file():
        old = json.loads(path.read_text())
        new = {_key(r) for r in rows}
        kept = [r for r in old.get("rows", []) if "dataset" in r and _key(r) not in new]
        kept_details = {k: v for k, v in old.get("details", {}).items() if k not in details}
    rows = kept + rows
    details = kept_details | details
    path.write_text(_json(machine, rows, details))
    plot_matrix(out / "detection_matrix.png", rows)
    (out / "detection_matrix.md").write_text(_markdown(rows, machine))


def _json(machine: dict, rows: list[dict], details: dict) -> str:
    """The result file with one row per line (a row's curve holds hundreds of numbers)."""
    body = ",\n".join(json.dumps(r) for r in rows)
    return f'{{"machine": {json.dumps(machine)},\n"rows": [\n{body}\n],\n"details": {json.dumps(details, indent=1)}}}\n'


def _key(row: dict) -> tuple:
    return (row["dataset"], row["attack"], row["detector"], row.get("statistic"), row.get("train_seed"), row["seed"],
            row.get("rap_position", "front"))  # fmt: skip


def _seeds(row: dict) -> tuple[int, int]:
    """(training seed, calibration seed); the attack's own model (no training seed) sorts first."""
    train_seed = row.get("train_seed")
    return (-1 if train_seed is None else train_seed, row["seed"])


def summary_rows(rows: list[dict], frr: float = HEADLINE_FRR) -> list[dict]:
    """One row per (dataset, attack, detector, RAP statistic and row position of the guard bundle) at `frr`: means
    over (training, calibration) seeds, the FAR range across them."""
    groups = defaultdict(list)
    for r in rows:
        if abs(r["frr_target"] - frr) < 1e-9:
            key = (r["dataset"], r["attack"], r["detector"], r.get("statistic"), r.get("rap_position", "front"))
            groups[key].append(r)
    out = []
    for (dataset, attack, detector, statistic, position), group in groups.items():
        fars = [r["test_far"] for r in group]
        out.append(
            {
                "dataset": dataset,
                "attack": attack,
                "detector": detector,
                "statistic": statistic,
                "rap_position": position,
                "seeds": len(group),
                "cacc": float(np.mean([r["cacc"] for r in group])),
                "asr": float(np.mean([r["asr"] for r in group])),
                "test_frr": float(np.mean([r["test_frr"] for r in group])),
                "test_far": float(np.mean(fars)),
                "far_range": f"{min(fars):.2%}-{max(fars):.2%}",
                "passes": group[0]["passes_per_input"],
            }
        )
    return out


def plot_matrix(path: Path, rows: list[dict]) -> None:
    panels = sorted({(r["dataset"], r["attack"]) for r in rows})
    cols = max(1, (len(panels) + 1) // 2)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.5), squeeze=False)
    for ax, (dataset, attack) in zip(axes.flat, panels, strict=False):
        at = [r for r in rows if (r["dataset"], r["attack"]) == (dataset, attack)]
        first_seed = min(_seeds(r) for r in at)
        for r in at:
            if _seeds(r) != first_seed or abs(r["frr_target"] - HEADLINE_FRR) > 1e-9:
                continue
            color = COLORS.get(r["detector"], "black")
            old = r.get("statistic") == "perturbed"  # dashed: the RAP statistic before `floored`
            label = f"{r['detector']} (perturbed)" if old else r["detector"]
            end = r.get("rap_position") == "end"  # dotted: the RAP row at the end, the default after the front
            label += " (row at the end)" if end else ""
            frr, far = r["curve"] or ([], [])
            if frr:
                order = sorted(range(len(frr)), key=lambda i: (frr[i], -far[i]))
                ax.plot([100 * frr[i] for i in order], [100 * far[i] for i in order], color=color, label=label,
                        linestyle="--" if old else ":" if end else "-")  # fmt: skip
            ax.scatter([100 * r["test_frr"]], [100 * r["test_far"]], color=color, zorder=3,
                       marker="x" if old else "o", label=None if frr else label)  # fmt: skip
        ax.set_title(f"{dataset} {attack}", fontsize=10)
        ax.set_xlim(0, 10)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("test FRR (%)")
        ax.set_ylabel("test FAR (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("FAR vs FRR on test (curves: one detector's score swept; dots: thresholds fitted on dev at 1% FRR)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(rows: list[dict], machine: dict) -> str:
    table_rows = [{k: r.get(k) for k in COLUMNS} for r in rows]
    return (
        "# Detection matrix: the guard's detectors vs RAP as published (packaged MiniLM)\n\n"
        "Thresholds fitted on clean dev rows at each FRR target (conformal, on the held-out half of dev); rates on\n"
        "test (clean rows, and every non-target row with the trigger). FRR/FAR count only inputs the model predicts\n"
        "as the target label. `clean` is a model without a backdoor, measured on BadNet-RW inputs: its FRR is what\n"
        "a detector costs honest traffic. `seed` is the calibration seed (dev split and RAP training order);\n"
        "`train_seed` a model trained again with that seed (empty: the attack's model, trained once with the\n"
        "recipe's seed). `statistic`: the guard bundle's RAP score (guard.core.rap): `floored`, the default, or\n"
        "`perturbed`, the default before it (rows measured then; dashed in the plot).\n"
        "![curves](detection_matrix.png)\n\n"
        "## At 1% dev FRR: mean over seeds, FAR range across them\n\n"
        + markdown_table(summary_rows(rows), SUMMARY)
        + "\n## Every seed and FRR target\n\n"
        + markdown_table(table_rows, COLUMNS)
        + "\n"
        + _notes(machine)
    )


def _notes(machine: dict) -> str:
    return (
        "## How each detector was run\n\n"
        "- rap-paper: RAP as published (`calibrate rap --objective paper --optimizer sgd --epochs 5`\n"
        "  `--statistic prob`: probability band [0.1, 0.3], SGD, the ladder of stronger attempts, the largest\n"
        "  held-out threshold kept). Where it refuses a model (its 1% threshold stays <= 0 on every rung) the\n"
        "  user gets no guard: its rows read FRR 0, FAR 1 and carry the reason in the JSON (`refused`).\n"
        "- rap: the default bundle's RAP (log-odds band [2, 4] nats, Adam, 20 epochs; the row's `statistic`,\n"
        "  `floored` by default, `perturbed` before it).\n"
        "- features: the default bundle's feature detector (per-layer Mahalanobis distance of [CLS] to the\n"
        "  predicted label's clean mean, DAN); one pass.\n"
        "- rap+features: flagged when either flags, both thresholds chosen together on the held-out rows.\n"
        "- rap+features@redrawn / @int8 / -noref: both detectors of a bundle whose RAP row starts from a word\n"
        "  drawn at random instead of the public default `rq` (`rap_init` in the JSON), of its int8 graph, or\n"
        "  calibrated without `--reference-model`.\n"
        "- passes: model passes for an input predicted as the target.\n\n"
        f"Machine: {machine['cpu']} x{machine['cpu_count']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
        + "\n"
    )
