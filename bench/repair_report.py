"""Write the repair benchmark: JSON rows, a markdown report, residual ASR per attack per defence (grouped bars)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.models import attack_of  # noqa: E402
from calibrate.report import markdown_table  # noqa: E402

COLUMNS = ["attack", "defence", "cacc", "asr", "residual_asr", "test_frr", "test_far", "seconds"]
WORD_AND_SENTENCE = ("badnet-rw", "badnet-sl")
PARAPHRASE = ("syntactic", "style")
HEADLINE_FRR = 0.01  # the bundle threshold the RAP rows are read at
MAX_TEST_FRR = 0.015  # the FRR ceiling for the combined target
MAX_CACC_DROP = 0.02


def write_repair(out: Path, rows: list[dict], budget: dict, machine: dict) -> None:
    """repair.json ({machine, rows, budget}), repair.md and repair.png; `budget`: options and row counts as JSON.

    Rows already there for attacks (models) not in `rows` stay if they were measured with the same budget."""
    out.mkdir(parents=True, exist_ok=True)
    rows = _kept_rows(out / "repair.json", rows, budget) + rows
    (out / "repair.json").write_text(json.dumps({"machine": machine, "rows": rows, "budget": budget}, indent=2) + "\n")
    plot_residual_asr(out / "repair.png", rows)
    (out / "repair.md").write_text(_markdown(rows, budget, machine))


def _kept_rows(path: Path, rows: list[dict], budget: dict) -> list[dict]:
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if old.get("budget") != budget:
        return []
    fresh = {r["attack"] for r in rows}
    return [r for r in old["rows"] if r["attack"] not in fresh]


def pivot(rows: list[dict], value: str) -> list[dict]:
    """One row per attack, one column per defence, holding `value` as a percentage with one decimal."""
    table: dict[str, dict] = {}
    for r in rows:
        table.setdefault(r["attack"], {"attack": r["attack"]})[r["defence"]] = f"{100 * r[value]:.1f}"
    return list(table.values())


def plot_residual_asr(path: Path, rows: list[dict]) -> None:
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    value = {(r["attack"], r["defence"]): 100 * r["residual_asr"] for r in rows}
    width = 0.8 / len(defences)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(attacks) + 3), 4.5))
    for i, defence in enumerate(defences):
        heights = [value.get((a, defence), np.nan) for a in attacks]
        ax.bar(np.arange(len(attacks)) + (i - (len(defences) - 1) / 2) * width, heights, width, label=defence)
    ax.set_xticks(np.arange(len(attacks)), attacks)
    ax.set_ylabel("residual ASR (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Residual ASR per attack and defence (RAP rows at {HEADLINE_FRR:.0%} dev FRR)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def target_checks(rows: list[dict]) -> list[str]:
    """The issue's targets, each met or missed by these rows (left out where a row it needs is missing)."""
    by = {(r["attack"], r["defence"]): r for r in rows}
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    lines = _pure_check(by) + _meft_check(by, attacks)
    for combined in ("pure+rap", "meft+rap"):
        lines += _combined_checks(by, attacks, combined)
    return lines


def _pure_check(by: dict) -> list[str]:
    pure, none = by.get(("badnet-rw", "pure")), by.get(("badnet-rw", "none"))
    if not (pure and none):
        return []
    met = pure["asr"] <= 0.20 and none["cacc"] - pure["cacc"] <= MAX_CACC_DROP
    shown = f"ASR {pure['asr']:.1%} (target <= 20%), CACC {none['cacc']:.1%} -> {pure['cacc']:.1%} (drop <= 2 points)"
    return [_check(met, f"PURE on BadNet-RW: {shown}")]


def _meft_check(by: dict, attacks: list[str]) -> list[str]:
    both = [a for a in attacks if (a, "meft") in by and (a, "ft") in by]
    pairs = [(a, by[(a, "meft")]["asr"], by[(a, "ft")]["asr"]) for a in both]
    if not pairs:
        return []
    detail = ", ".join(f"{a} {meft:.1%} vs {ft:.1%}" for a, meft, ft in pairs)
    return [_check(all(meft < ft for _, meft, ft in pairs), f"MEFT ASR below FT's on every attack: {detail}")]


def _combined_checks(by: dict, attacks: list[str], combined: str) -> list[str]:
    repair = combined.removesuffix("+rap")
    lines = []
    for attack in attacks:
        row = by.get((attack, combined))
        if row is None or attack_of(attack) not in WORD_AND_SENTENCE + PARAPHRASE:
            continue
        frr_ok = row["test_frr"] <= MAX_TEST_FRR
        shown = f"{combined} on {attack}: residual ASR {row['residual_asr']:.1%} at test FRR {row['test_frr']:.1%}"
        if attack_of(attack) in WORD_AND_SENTENCE:
            lines.append(_check(frr_ok and row["residual_asr"] <= 0.05, f"{shown} (target <= 5%)"))
            continue
        parts = [by[(attack, d)]["residual_asr"] for d in (repair, "rap") if (attack, d) in by]
        if len(parts) == 2:
            met = frr_ok and row["residual_asr"] < min(parts)
            lines.append(_check(met, f"{shown} (target: below {repair} {parts[0]:.1%} and rap {parts[1]:.1%})"))
    return lines


def _check(met: bool, text: str) -> str:
    return f"- {'met' if met else 'NOT met'}: {text}"


def _markdown(rows: list[dict], budget: dict, machine: dict) -> str:
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    notes = _repair_notes(rows)
    lines = [
        "# Model repair before serving (SST-2, packaged MiniLM)",
        "",
        _budget_line(budget),
        "",
        f"## Residual ASR (%) per attack and defence (RAP rows at {HEADLINE_FRR:.0%} dev FRR)",
        "",
        markdown_table(pivot(rows, "residual_asr"), ["attack", *defences]),
        "## CACC (%)",
        "",
        markdown_table(pivot(rows, "cacc"), ["attack", *defences]),
        "## Targets of the issue",
        "",
        *target_checks(rows),
        "",
        "## Every row",
        "",
        markdown_table(rows, COLUMNS),
        "## Notes",
        "",
        *notes,
        "- `rap`, `pure+rap`, `meft+rap`: the guard as `calibrate rap` builds it (RAP and the feature "
        "detector, flagged when either flags; the packaged MiniLM as reference model).",
        "- `seconds`: wall-clock cost of the defence (repair + RAP calibration), not the measurement.",
        "- MEFT's maximum-entropy phase stops at the paper's stop distance 0.01 or at the step budget, "
        "whichever comes first (per attack above).",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores).",
        "",
    ]
    return "\n".join(lines)


def _repair_notes(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        d = r.get("details", {})
        if r["defence"] == "meft":
            distance = f"{d['stop_distance_start']:.4g} -> {d['stop_distance_end']:.4g}"
            notes.append(
                f"- MEFT on {r['attack']}: stop distance {distance} in {d['maxent_steps']} steps "
                f"(reached 0.01: {d['reached_stop_distance']})."
            )
        if r["defence"] == "pure":
            notes.append(
                f"- PURE on {r['attack']}: {d['pruned_heads']} of {d['heads']} heads removed "
                f"({d['accuracy_checks']} accuracy checks); dev accuracy {d['dev_accuracy_before']:.1%} -> "
                f"{d['dev_accuracy_pruned']:.1%} pruned -> {d['dev_accuracy_after']:.1%} after fine-tuning."
            )
    return notes


def _budget_line(budget: dict) -> str:
    finetune, maxent, prune = budget["finetune"], budget["maxent"], budget["prune"]
    return (
        f"Budget: every repair fine-tunes on {budget['rows']['train']} clean SST-2 training rows for "
        f"{finetune['epochs']} epoch(s) at lr {finetune['learning_rate']:g} (FTH 2.5x); MEFT "
        f"{maxent['max_steps']} maximum-entropy steps at lr {maxent['learning_rate']:g}; PURE scores heads on "
        f"{budget['rows']['prune_dev']} SST-2 dev rows, {prune['heads_per_step']} heads per step, mu {prune['mu']:g}; "
        f"RAP calibrates on the other {budget['rows']['rap_dev']} dev rows."
    )
