"""Calibration and evaluation reports: JSON for machines, a picture for people."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_json(path: Path, payload: Mapping) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def plot_scores(
    path: Path,
    clean: Mapping[str, np.ndarray],
    thresholds: Mapping[str, Mapping[float, float]],
    xlabel: str,
    poisoned: Mapping[str, np.ndarray] | None = None,
    title: str = "RAP scores",
) -> None:
    """Histogram of RAP scores per protected label (clean, and poisoned if given) with threshold lines;
    `xlabel`: the bundle's statistic (guard.core.rap.FORMULAS)."""
    fig, axes = plt.subplots(len(clean), 1, figsize=(7, 3.2 * len(clean)), squeeze=False)
    for ax, (name, deltas) in zip(axes[:, 0], clean.items(), strict=True):
        values = [deltas] + [v for v in (poisoned or {}).values() if len(v)]
        lo, hi = min(float(np.min(v)) for v in values), max(float(np.max(v)) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 60)
        ax.hist(deltas, bins=bins, alpha=0.6, label=f"clean ({len(deltas)})", color="tab:blue")
        colours = iter(["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive"] * 4)
        for attack, d in (poisoned or {}).items():
            if len(d):
                ax.hist(d, bins=bins, alpha=0.5, label=f"{attack} ({len(d)})", color=next(colours))
        styles = iter(["-", "--", "-.", ":"] * 4)
        for frr, t in sorted(thresholds.get(name, {}).items()):
            ax.axvline(
                t, linestyle=next(styles), linewidth=1, color="black", label=f"threshold @ {frr:.1%} FRR: {t:+.4f}"
            )
        ax.set_title(f"{title}: label {name}")
        ax.set_xlabel(f"RAP score = {xlabel}; flagged if right of the threshold")
        ax.set_ylabel("inputs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_far_frr(
    path: Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    points: Mapping[str, list[tuple[float, float, float]]],
) -> None:
    """FAR against FRR per attack as the threshold sweeps; stored targets marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for attack, (frr, far) in curves.items():
        (line,) = ax.plot(frr * 100, far * 100, label=attack)
        for i, (target, x, y) in enumerate(points.get(attack, [])):
            ax.scatter([x * 100], [y * 100], color=line.get_color(), zorder=3)
            offset = (4, 6 + 10 * (i % 2))  # stagger labels: the targets sit close together
            ax.annotate(f"{target:.1%}", (x * 100, y * 100), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlim(0, 20)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("FRR on clean test inputs (%)")
    ax.set_ylabel("FAR on poisoned test inputs (%)")
    ax.set_title("RAP: false accepts vs false rejects (dots: dev-chosen FRR targets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[Mapping], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _jsonable(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
