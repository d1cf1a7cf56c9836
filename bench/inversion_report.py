"""The inversion benchmark's verdicts and files: a loss threshold fitted on the zoo, JSON and markdown.

A scan calls a model backdoored when its suspect pair's loss is under a threshold.
The threshold the benchmark fits is the one that classifies the zoo best; with a
handful of models that is an optimistic number, so every model is also judged by
a threshold fitted on the OTHER models (leave-one-out), the estimate for a model
the threshold has not seen.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

from calibrate.report import markdown_table

LOSS_FLOOR = 1e-12  # losses are clamped here so geometric midpoints stay defined
SCAN_COLUMNS = [
    "model",
    "backdoored",
    "verdict",
    "verdict_loo",
    "verdict_scan",
    "found_pair",
    "found_trigger",
    "true_trigger",
    "trigger_recovered",
    "loss",
    "asr",
    "seconds",
]
REPAIR_COLUMNS = [
    "model",
    "method",
    "unlearned",
    "cacc_before",
    "cacc_after",
    "asr_before",
    "asr_after",
    "eps_ma2_before",
    "eps_ma2_after",
    "seconds",
]


def fit_threshold(losses: Sequence[float], truth: Sequence[bool]) -> float:
    """The loss threshold (backdoored when loss < threshold) with the best accuracy on these models.

    Candidates: below every loss, the geometric midpoint of each two neighbouring losses
    (losses span decades: 0.003 planted, 0.7 natural), above every loss. Ties go to the
    widest gap between the neighbours in log loss: the most margin on either side.
    """
    clamped = [max(loss, LOSS_FLOOR) for loss in losses]
    ordered = sorted(set(clamped))
    candidates = [(ordered[0] / 2, 0.0), (ordered[-1] * 2, 0.0)]
    candidates += [(math.sqrt(a * b), math.log(b / a)) for a, b in itertools.pairwise(ordered)]

    def score(candidate: tuple[float, float]) -> tuple[float, float]:
        threshold, gap = candidate
        right = sum((loss < threshold) == backdoored for loss, backdoored in zip(clamped, truth, strict=True))
        return right, gap

    return max(candidates, key=score)[0]


def leave_one_out(losses: Sequence[float], truth: Sequence[bool]) -> list[tuple[float, bool]] | None:
    """Per model: the threshold fitted on the other models and the verdict it gives this one (None: one model)."""
    if len(losses) < 2:
        return None
    out = []
    for i, loss in enumerate(losses):
        threshold = fit_threshold(losses[:i] + losses[i + 1 :], truth[:i] + truth[i + 1 :])
        out.append((threshold, max(loss, LOSS_FLOOR) < threshold))
    return out


def detection(verdicts: Sequence[bool], truth: Sequence[bool]) -> dict:
    """Accuracy, TPR (backdoored models flagged), TNR (clean models passed); None where there is no such model."""
    pairs = list(zip(verdicts, truth, strict=True))
    positives = [v for v, t in pairs if t]
    negatives = [not v for v, t in pairs if not t]
    return {
        "models": len(pairs),
        "accuracy": sum(v == t for v, t in pairs) / len(pairs),
        "tpr": sum(positives) / len(positives) if positives else None,
        "tnr": sum(negatives) / len(negatives) if negatives else None,
    }


def judge(scan_rows: list[dict]) -> tuple[list[dict], dict]:
    """Scan rows with the fitted (`verdict`) and leave-one-out (`verdict_loo`) verdicts, and the detection rates."""
    losses, truth = [r["loss"] for r in scan_rows], [r["backdoored"] for r in scan_rows]
    fitted = fit_threshold(losses, truth)
    loo = leave_one_out(losses, truth)
    rows = [
        {**row, "verdict": max(row["loss"], LOSS_FLOOR) < fitted, "verdict_loo": None if loo is None else loo[i][1]}
        for i, row in enumerate(scan_rows)
    ]
    summary = {
        "scan_threshold": {"threshold": scan_rows[0]["scan_threshold"], **_rates(rows, "verdict_scan", truth)},
        "fitted": {"threshold": fitted, **_rates(rows, "verdict", truth)},
        "leave_one_out": _loo_rates(rows, loo, truth),
        "word_triggers": _word_trigger_rates(rows),
    }
    return rows, summary


def _word_trigger_rates(rows: list[dict]) -> dict:
    """The scan's own threshold on the models it is built for: clean ones and one-word planted triggers."""
    chosen = [r for r in rows if not r["backdoored"] or all(len(t.split()) == 1 for t in r["true_trigger"] or ["a b"])]
    return {
        "threshold": rows[0]["scan_threshold"],
        **detection([r["verdict_scan"] for r in chosen], [r["backdoored"] for r in chosen]),
    }


def _rates(rows: list[dict], key: str, truth: list[bool]) -> dict:
    return detection([r[key] for r in rows], truth)


def _loo_rates(rows: list[dict], loo: list[tuple[float, bool]] | None, truth: list[bool]) -> dict | None:
    return None if loo is None else {"thresholds": [t for t, _ in loo], **_rates(rows, "verdict_loo", truth)}


def write_inversion(out: Path, results: list[dict], budget: dict, machine: dict) -> None:
    """inversion.json ({machine, scan, repair, detection, budget}) and inversion.md; `budget`: options as JSON."""
    out.mkdir(parents=True, exist_ok=True)
    scan, summary = judge([r["scan"] for r in results])
    repair = [row for r in results for row in r["repair"]]
    payload = {"machine": machine, "scan": scan, "repair": repair, "detection": summary, "budget": budget}
    (out / "inversion.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "inversion.md").write_text(_markdown(payload))


def _markdown(payload: dict) -> str:
    scan, detection_rates = payload["scan"], payload["detection"]
    shown = [{**r, "true_trigger": " / ".join(r["true_trigger"] or []) or None} for r in scan]
    recoverable = [r for r in scan if r["trigger_recovered"] is not None]
    seconds = [r["seconds"] for r in scan]
    lines = [
        "# Trigger inversion on a model zoo (SST-2, packaged MiniLM)",
        "",
        _budget_line(payload["budget"]),
        "",
        "## Scan",
        "",
        markdown_table(shown, SCAN_COLUMNS),
        markdown_table(_detection_rows(detection_rates), ["rule", "threshold", "models", "accuracy", "tpr", "tnr"]),
        f"True trigger recovered (every found word is a planted trigger word) on "
        f"{sum(r['trigger_recovered'] for r in recoverable)} of {len(recoverable)} token-trigger backdoors; "
        f"target label recovered on {sum(bool(r['target_recovered']) for r in scan)} of "
        f"{sum(r['backdoored'] for r in scan)} backdoored models. "
        f"Scan time per model: {min(seconds):.0f}-{max(seconds):.0f} s.",
        "",
        "## Repair",
        "",
        markdown_table(
            [{**r, "unlearned": " / ".join(r.get("triggers", []))} for r in payload["repair"]], REPAIR_COLUMNS
        ),
        "## Notes",
        "",
        "- `verdict`: the suspect pair's loss under the threshold fitted on this zoo (best accuracy, optimistic); "
        "`verdict_loo`: under the threshold fitted on the other models (leave-one-out, the honest estimate); "
        "`verdict_scan`: under the scan's own threshold.",
        "- A 1-token scan can recover at most one word of the BadNet-SL sentence; any word of it counts. "
        "Syntactic and style backdoors have no typed trigger (`true_trigger` empty).",
        "- `asr_*`: the planted trigger's ASR on the recipe's triggered SST-2 test rows (the clean model: "
        "BadNet-RW rows, i.e. natural flips); `cacc_*`: SST-2 test accuracy. Unlearning removes the triggers the "
        "scan flagged at its own threshold; the unlearned model is scanned again, and triggers it newly flags are "
        "added and unlearned from the original weights (`unlearned`: all of them, in the order found).",
        "- Training: the five attack models and `clean` are fine-tuned 3 epochs (BadNet-SL, syntactic, style: 2) on "
        "all of SST-2 train, seed 13; `clean-s1`/`clean-s2` 1 epoch on 2,000 rows with seeds 1/2 (CPU budget); "
        "`ep-neg` trains the `tq` embedding row of `clean` towards NEGATIVE (2 epochs, 1,500 rows).",
        "",
        f"Machine: {payload['machine']['cpu']} ({payload['machine']['cpu_count']} cores).",
        "",
    ]
    return "\n".join(lines)


def _detection_rows(rates: dict) -> list[dict]:
    """One row per threshold rule, the threshold formatted (leave-one-out: the range of its thresholds)."""
    rules = [("scan's own", rates["scan_threshold"]), ("fitted on the zoo", rates["fitted"])]
    if "word_triggers" in rates:
        rules.append(("scan's own, clean + word-trigger models only", rates["word_triggers"]))
    rows = [{**rule, "rule": name, "threshold": f"{rule['threshold']:.3g}"} for name, rule in rules]
    loo = rates["leave_one_out"]
    if loo is not None:
        spread = f"{min(loo['thresholds']):.3g}-{max(loo['thresholds']):.3g}"
        rows.append({**loo, "rule": "leave-one-out", "threshold": spread})
    return rows


def _unlearning(budget: dict) -> str:
    unlearn = budget["unlearn"]
    teacher = unlearn.get("teacher_weight", 0)
    return (
        f"{unlearn['epochs']} epochs at lr {unlearn['learning_rate']:g}, "
        + (f"targets {teacher:g} teacher softmax / {1 - teacher:g} label, " if teacher else "hard labels, ")
        + _reset(unlearn.get("reset_embeddings", "none"), unlearn.get("reset_enough"))
        + f"up to {budget.get('rescans', 0)} rescans"
    )


def _reset(mode: str, enough: float | None) -> str:
    if mode == "none":
        return ""
    which = "outlier-norm" if mode == "outliers" else "all"
    return f"{which} trigger embeddings reset to the mean first (no fine-tuning if that leaves ASR <= {enough:g}), "


def _budget_line(budget: dict) -> str:
    scan, harden = budget["scan"], budget["harden"]
    return (
        f"Budget: scan {scan['inversion']['steps']} DBS steps per pair, trigger length {scan['trigger_length']}, "
        f"{scan['rows_per_label']} inversion + up to {scan['heldout_per_label']} held-out SST-2 dev rows per label; "
        f"unlearning {_unlearning(budget)}; "
        f"hardening epsilon {harden['max_trigger_length']}, {harden['epochs']} epoch on {budget['harden_rows']} "
        f"of the {budget['rows']['repair']} clean SST-2 training rows unlearning uses, "
        f"{harden['inversion']['steps']} DBS steps per inversion."
    )
