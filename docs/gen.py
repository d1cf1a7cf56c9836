"""The generated parts of the docs: `python -m docs.gen` rewrites them, `--check` only reports.

A generated block sits between `<!-- generated: NAME -->` and `<!-- /generated: NAME -->` in
README.md or a page under docs/; NAME is a key of GENERATORS, each a function of the code or of
bench/results/*.json. Everything between the markers is replaced, so edit the code or the
results, never the block. tests/unit/test_docs.py fails when a committed block is stale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HELP_COLUMNS = "100"  # argparse wraps help to the terminal: fixed, so the block does not depend on who ran it
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- /generated: \2 -->)", re.S)


def pages() -> list[Path]:
    """Every file that may hold a generated block."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(text: str) -> str:
    """`text` with every generated block rewritten from its generator."""

    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(GENERATORS)}")
        return match.group(1) + GENERATORS[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def stale() -> list[Path]:
    """The pages whose generated blocks differ from what the generators write now."""
    return [p for p in pages() if render(p.read_text()) != p.read_text()]


def blocks_used() -> set[str]:
    return {m.group(2) for p in pages() for m in BLOCK.finditer(p.read_text())}


# ------------------------------------------------------------------ tables


def _cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(columns: list[str], rows: list[list[object]]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(c) for c in row) + " |\n" for row in rows)


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.default_factory() if field.default_factory else field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value) if value else "`[]`"
    return f"`{value}`"


def settings_table() -> str:
    """Every field of guard.settings.Settings: name, environment variable, default, description."""
    from guard.settings import Settings

    rows = [
        [f"`{name}`", f"`GUARD_{name.upper()}`", _default(field), field.description or ""]
        for name, field in Settings.model_fields.items()
    ]
    return _table(["setting", "environment", "default", "description"], rows)


def metrics_table() -> str:
    """Every metric of guard.metrics.GuardMetrics: name, type, labels, where it is served, help."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from guard.metrics import GuardMetrics

    m = GuardMetrics(CollectorRegistry(), "onnx")
    service = set(m.registry._collector_to_names)
    rows = []
    for metric in vars(m).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + ("_total" if metric._type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames) or "–"
        where = "both ports" if metric in service else "`metrics_port` only"
        rows.append([f"`{name}`", metric._type, labels, where, metric._documentation])
    return _table(["metric", "type", "labels", "served on", "description"], sorted(rows))


def metric_names() -> set[str]:
    """The metric names an exposition holds (counters with _total; histograms' series too)."""
    names = set()
    for row in metrics_table().splitlines()[2:]:
        name, kind = row.split(" | ")[0].strip("| `"), row.split(" | ")[1]
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


@contextlib.contextmanager
def _columns() -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def subcommands() -> dict[str, dict[str, argparse.ArgumentParser]]:
    """{'guard': {'serve': parser, ...}, 'calibrate': {...}}, in the order each --help lists them."""
    from calibrate.cli import _parser as calibrate_parser
    from guard.cli import _parser as guard_parser

    out = {}
    for prog, parser in (("guard", guard_parser()), ("calibrate", calibrate_parser())):
        group = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        out[prog] = dict(group.choices)
    return out


def help_text(parser: argparse.ArgumentParser) -> str:
    with _columns():
        return parser.format_help()


def cli_reference() -> str:
    """`--help` of every guard and calibrate command."""
    parts = []
    for prog, commands in subcommands().items():
        for name, parser in commands.items():
            parts.append(f"### `{prog} {name}`\n\n```text\n{help_text(parser).rstrip()}\n```\n")
    return "\n".join(parts)


def _matrix_rows() -> list[dict]:
    """bench.matrix_report's summary (1% target, mean over seeds), SST-2 first, attacks in ATTACK_NAMES order;
    `refused` where a detector built no guard for the model."""
    from bench.matrix_report import HEADLINE_FRR, summary_rows

    rows = json.loads((RESULTS / "detection_matrix.json").read_text())["rows"]
    refused: dict[tuple, int] = {}
    for r in rows:
        if r.get("refused") and abs(r["frr_target"] - HEADLINE_FRR) < 1e-9:
            key = (r["dataset"], r["attack"], r["detector"])
            refused[key] = refused.get(key, 0) + 1
    summary = [{**r, "refused": refused.get((r["dataset"], r["attack"], r["detector"]), 0)} for r in summary_rows(rows)]
    order = list(ATTACK_NAMES)
    return sorted(summary, key=lambda r: (r["dataset"] != "sst2", r["dataset"], order.index(r["attack"])))


def _current(rows: list[dict]) -> list[dict]:
    """Per (dataset, attack, detector) the rows of the guard's defaults where they were measured: the default RAP
    statistic with the RAP row at the default position, else the row at the front (the default before), else the
    statistic before (`perturbed`); the tables mark which (`_statistic`)."""

    from guard.core.rap import DEFAULT_STATISTIC

    def rank(r: dict) -> tuple[bool, bool]:
        return _position(r) == _default_position(), r.get("statistic") in (None, DEFAULT_STATISTIC)

    best: dict[tuple, tuple[bool, bool]] = {}
    for r in rows:
        key = (r["dataset"], r["attack"], r["detector"])
        best[key] = max(best.get(key, rank(r)), rank(r))
    return [r for r in rows if rank(r) == best[(r["dataset"], r["attack"], r["detector"])]]


def _position(row: dict) -> str:
    """Where the row's guard bundle put the RAP row (rows without the field were calibrated at the front)."""
    return row.get("rap_position") or "front"


def _at(rows: list[dict], position: str) -> list[dict]:
    """The rows of guard bundles with the RAP row at `position` (and rows of detectors without one)."""
    return [r for r in rows if _position(r) == position]


def _statistic(row: dict) -> str:
    """The guard bundle's RAP statistic and where its row sits (`--rap-position`)."""
    statistic = row.get("statistic")
    return "–" if statistic is None else f"{statistic}, {_position(row)}"


def _default_position() -> str:
    """Where `calibrate rap` puts the RAP row by default (`--rap-position`)."""
    from calibrate.rap.options import RapOptions

    return RapOptions.rap_position


def _pct(x: float) -> str:
    return f"{x:.1%}"


ATTACK_NAMES = {
    "clean": "clean model (no backdoor)",
    "badnet-rw": "rare words (BadNet-RW)",
    "badnets": "rare words (BadNets)",
    "badnet-sl": "a sentence (BadNet-SL)",
    "ep": "embedding poisoning (EP)",
    "ep-bounded": "EP, trigger norm bounded",
    "syntactic": "syntactic template",
    "style": "Bible style",
    "badnet-sl-2k": "a sentence, 2,000-row model (the adaptive attacks' plain twin)",
    "adaptive-sl": "a sentence, adaptive: switches off under RAP's insertion",
    "adaptive-cls": "a sentence, adaptive: keeps clean-looking [CLS] features",
    "adaptive-both": "a sentence, adaptive: both at once",
    "adaptive-init": "a sentence, adaptive: both, the switch taught on RAP's default init word",
    "adaptive-init-ends": "a sentence, adaptive: both, the switch taught on RAP's default init word at both ends",
}


def headline_table() -> str:
    """The README's table: RAP and features at the 1% FRR target (mean over seeds) and, where measured, every
    detector with the reader (the default for a model of the packaged MiniLM's vocabulary)."""
    from bench.adaptive import PLAIN

    current = _current(_matrix_rows())
    reader = {(r["dataset"], r["attack"]): r for r in current if r["detector"] == "rap+features+reader"}
    rows = []
    for r in current:
        if r["detector"] != "rap+features" or r["attack"] in (PLAIN, *MATRIX_ADAPTIVE):  # `adaptive_summary`'s
            continue
        far = "–" if r["attack"] == "clean" else _pct(r["test_far"])
        name = ATTACK_NAMES.get(r["attack"], r["attack"])
        read = reader.get((r["dataset"], r["attack"]))
        with_reader = "–" if read is None else f"{_pct(read['test_frr'])} / {_pct(read['test_far'])}"
        if read is not None and _position(read) != _default_position():
            with_reader += f" ({_position(read)})"
        rows.append([r["dataset"], name, _pct(r["asr"]), _pct(r["test_frr"]), far, r["seeds"], _statistic(r),
                     with_reader])  # fmt: skip
    columns = ["dataset", "backdoor trigger", "attack success unguarded", "clean blocked (FRR)",
               "triggered let through (FAR)", "seeds", "RAP statistic, row position",
               "with the reader: FRR / FAR (1 seed)"]  # fmt: skip
    return _table(columns, rows)


DETECTORS = ["rap-paper", "rap", "features", "rap+features", "rap+features-noref", "rap+features@int8"]


def adaptive_table() -> str:
    """The adaptive attackers measured (bench.adaptive's plain twin and the matrix's adaptive attacks): each served
    detector's test FRR / FAR at the 1% target, per dataset, with the RAP row at the front (the default before)
    and at the end (the default)."""
    from bench.adaptive import PLAIN

    by = {(r["dataset"], r["attack"], r["detector"], r.get("statistic"), _position(r)): r for r in _matrix_rows()}
    served = [("rap", "perturbed", "front"), ("rap", "floored", "front"), ("features", "floored", "front"),
              ("rap+features", "perturbed", "front"), ("rap+features", "floored", "front"),
              ("rap+features@redrawn", "floored", "front"), ("rap", "floored", "end"),
              ("rap+features", "floored", "end")]  # fmt: skip
    rows = []
    for dataset in ("sst2", "offenseval"):
        for attack in (PLAIN, *MATRIX_ADAPTIVE):
            cells = [by.get((dataset, attack, *key)) for key in served]
            # the feature detector does not read pass 2: any bundle's
            cells[2] = cells[2] or by.get((dataset, attack, "features", "perturbed", "front"))
            cells[2] = cells[2] or by.get((dataset, attack, "features", "floored", "end"))
            if not any(cells):
                continue
            pair = [f"{_pct(c['test_frr'])} / {_pct(c['test_far'])}" if c else "–" for c in cells]
            asr = next(c["asr"] for c in cells if c)
            rows.append([dataset, attack, ATTACK_NAMES[attack], _pct(asr), *pair])
    columns = ["dataset (one model)", "attack", "trigger", "ASR", "RAP (perturbed, before)", "RAP (floored)",
               "features", "both, perturbed (the default before)", "both, floored (the default before)",
               "both, floored, RAP row from a secret word", "RAP, row at the end",
               "both, row at the end (the default)"]  # fmt: skip
    return _table(columns, rows)


SHORT_NAMES = {
    "badnet-sl-2k": "plain twin",
    "adaptive-sl": "switch-off",
    "adaptive-cls": "clean [CLS]",
    "adaptive-both": "both",
    "adaptive-init": "both, switch-off at the front",
    "adaptive-init-ends": "both, switch-off at both ends",
}
MATRIX_ADAPTIVE = ("adaptive-sl", "adaptive-cls", "adaptive-both", "adaptive-init", "adaptive-init-ends")


def adaptive_summary() -> str:
    """The README's line per dataset: triggered inputs let through (FAR, test FRR) at the 1% target per adaptive
    attack and the plain twin, by bundles with the RAP row at the front (the default before: RAP and features, the
    reader, `--switch`, trusted texts) and at the end (the default)."""
    from bench.adaptive import PLAIN
    from guard.core.rap import DEFAULT_STATISTIC

    rows = [r for r in _matrix_rows() if r.get("statistic") == DEFAULT_STATISTIC]
    by = {(r["dataset"], r["attack"], r["detector"], _position(r)): r for r in rows}

    def cells(dataset: str, detector: str, position: str = "front") -> list[str]:
        return [f"{SHORT_NAMES[a]} {_far_frr(by[dataset, a, detector, position])}"
                for a in (PLAIN, *MATRIX_ADAPTIVE) if (dataset, a, detector, position) in by]  # fmt: skip

    lines = []
    for dataset, label in (("sst2", "SST-2"), ("offenseval", "OLID")):
        front = cells(dataset, "rap+features")
        read, switch, trusted = (
            cells(dataset, d)
            for d in ("rap+features+reader", "rap+features+reader+switch", "rap+features+reader@texts-trusted")
        )
        end, end_read = cells(dataset, "rap+features", "end"), cells(dataset, "rap+features+reader", "end")
        end_switch = cells(dataset, "rap+features+reader+switch", "end")
        if front or end:
            lines.append(
                f"- **{label}**, row at the front: "
                + ", ".join(front)
                + ("; with the reader: " + ", ".join(read) if read else "")
                + ("; and `--switch`: " + ", ".join(switch) if switch else "")
                + ("; the reader on 2,000 `--reader-texts-trusted`: " + ", ".join(trusted) if trusted else "")
                + ("; **row at the end** (the default): " + ", ".join(end) if end else "")
                + ("; with the reader: " + ", ".join(end_read) if end_read else "")
                + ("; and `--switch`: " + ", ".join(end_switch) if end_switch else "")
            )
    return "\n".join(lines) + "\n"


def reader_table() -> str:
    """The reader detector's matrix rows (bundles calibrated with `--reader`): per dataset and attack, FAR (test
    FRR) of RAP and features, of every detector with the reader, with a reader distilled on augmented rows, and
    with the reader and the switch detector (`--switch`), at the 1% and 3% targets (one seed)."""
    from guard.core.rap import DEFAULT_STATISTIC

    rows = json.loads((RESULTS / "detection_matrix.json").read_text())["rows"]
    at = {(r["dataset"], r["attack"], r["detector"], round(r["frr_target"], 4)): r for r in rows
          if r.get("statistic") == DEFAULT_STATISTIC and r.get("train_seed") is None and r["seed"] == 13
          and _position(r) == "front"}  # fmt: skip
    order = [*ATTACK_NAMES, *SHORT_NAMES]
    measured = dict.fromkeys((d, a) for d, a, det, _ in at if det == "rap+features+reader")
    out = []
    for dataset, attack in sorted(measured, key=lambda k: (k[0] != "sst2", k[0], order.index(k[1]))):
        cells = []
        for frr in (0.01, 0.03):
            for detector in (
                "rap+features",
                "rap+features+reader",
                "rap+features+reader@aug4",
                "rap+features+reader+switch",
            ):
                r = at.get((dataset, attack, detector, frr))
                cells.append("–" if r is None else f"{_pct(r['test_far'])} ({_pct(r['test_frr'])})")
        out.append([dataset, SHORT_NAMES.get(attack, ATTACK_NAMES.get(attack, attack)), *cells])
    columns = ["dataset", "attack", "RAP + features, 1%", "with the reader, 1%", "reader, --reader-augment 4, 1%",
               "reader and --switch, 1%", "RAP + features, 3%", "with the reader, 3%",
               "reader, --reader-augment 4, 3%", "reader and --switch, 3%"]  # fmt: skip
    return _table(columns, out)


def reader_texts_table() -> str:
    """The reader distilled on unlabeled texts too (`--reader-texts`, matrix detectors reader@texts*): per dataset,
    attack and target (1%, 3%), FAR (test FRR) of every detector with the plain reader, with the texts screened
    (the default) and trusted (unscreened), each on clean texts and on texts 1% triggered (seed 13)."""
    from guard.core.rap import DEFAULT_STATISTIC

    rows = json.loads((RESULTS / "detection_matrix.json").read_text())["rows"]
    at = {(r["dataset"], r["attack"], r["detector"], round(r["frr_target"], 4)): r for r in rows
          if r.get("statistic") == DEFAULT_STATISTIC and r.get("train_seed") is None and r["seed"] == 13
          and _position(r) == "front"}  # fmt: skip
    shown = ("", "@texts", "@texts-trusted", "@texts-dirty", "@texts-dirty-trusted")
    order = [*ATTACK_NAMES, *SHORT_NAMES]
    measured = dict.fromkeys((d, a) for d, a, det, _ in at if det.startswith("rap+features+reader@texts"))
    out = []
    for dataset, attack in sorted(measured, key=lambda k: (k[0] != "sst2", k[0], order.index(k[1]))):
        for frr in (0.01, 0.03):
            found = [at.get((dataset, attack, f"rap+features+reader{d}", frr)) for d in shown]
            name = SHORT_NAMES.get(attack, ATTACK_NAMES.get(attack, attack))
            out.append([dataset, name, _pct(frr), *("–" if r is None else _far_frr(r) for r in found)])
    columns = ["dataset", "attack", "target", "with the reader", "+ texts, screened", "+ texts, trusted",
               "1% triggered, screened", "1% triggered, trusted"]  # fmt: skip
    return _table(columns, out)


def rap_position_table() -> str:
    """Where pass 2 puts the RAP row (`--rap-position`): per dataset, attack and target (1%, 3%), FAR (test FRR) of
    RAP alone, RAP and features, and every detector with the reader, at the front and at the end (seed 13)."""
    from guard.core.rap import DEFAULT_STATISTIC

    rows = json.loads((RESULTS / "detection_matrix.json").read_text())["rows"]
    at = {(r["dataset"], r["attack"], r["detector"], _position(r), round(r["frr_target"], 4)): r for r in rows
          if r.get("statistic") == DEFAULT_STATISTIC and r.get("train_seed") is None and r["seed"] == 13}  # fmt: skip
    order = [*ATTACK_NAMES, *SHORT_NAMES]
    measured = dict.fromkeys((d, a) for d, a, _, position, _ in at if position == "end")
    out = []
    for dataset, attack in sorted(measured, key=lambda k: (k[0] != "sst2", k[0], order.index(k[1]))):
        for frr in (0.01, 0.03):
            shown = [(d, p) for d in ("rap", "rap+features", "rap+features+reader") for p in ("front", "end")]
            found = [at.get((dataset, attack, detector, position, frr)) for detector, position in shown]
            name = SHORT_NAMES.get(attack, ATTACK_NAMES.get(attack, attack))
            out.append([dataset, name, _pct(frr), *("–" if r is None else _far_frr(r) for r in found)])
    columns = ["dataset", "attack", "target", "RAP, front", "RAP, end", "RAP + features, front", "RAP + features, end",
               "with the reader, front", "with the reader, end"]  # fmt: skip
    return _table(columns, out)


def _far_frr(row: dict) -> str:
    return f"{_pct(row['test_far'])} ({_pct(row['test_frr'])})"


def reference_table() -> str:
    """bench.reference_disagreement at the 1% target: the default bundle, a clean reference's disagreement alone
    (both scores) and united with the default, per dataset, attack and reference reader (test FRR / FAR)."""
    shown = ["floored+features", "reference", "reference-diff", "floored+features+reference-diff"]
    rows = []
    for r in _results("reference_disagreement")["results"]:
        at = {p["variant"]: p for p in r["points"] if abs(p["frr_target"] - 0.01) < 1e-9}
        cells = [f"{_pct(at[v]['test_frr'])} / {_pct(at[v]['test_far'])}" for v in shown]
        reader = f"{r['reference']} ({_pct(r['reference_accuracy'])})"
        rows.append([r["dataset"], r["attack"], reader, *cells])
    columns = ["dataset", "attack", "reader (its test accuracy)", "default bundle", "reader disagrees",
               "suspect minus reader log-odds", "default + the difference"]  # fmt: skip
    return _table(columns, rows)


def detection_matrix_table() -> str:
    """Per dataset and attack, each detector's test FRR / FAR at the 1% target (mean, FAR range, seeds)."""
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    asr: dict[tuple[str, str], float] = {}
    for r in _current(_matrix_rows()):
        key = (r["dataset"], r["attack"])
        by_key.setdefault(key, {})[r["detector"]] = r
        if r["detector"] == "rap+features" or key not in asr:
            asr[key] = r["asr"]

    def cell(r: dict | None, clean: bool) -> str:
        if r is None:
            return "–"
        if r["refused"] == r["seeds"]:
            return "refused (no guard: FAR 100%)"
        old = " [perturbed]" if r.get("statistic") == "perturbed" and "rap" in r["detector"] else ""  # before floored
        if not old and r.get("statistic") and "rap" in r["detector"] and _position(r) != _default_position():
            old += f" [{_position(r)}]"  # the RAP row where it was before the default moved it
        if clean:
            return f"{_pct(r['test_frr'])} FRR{old}"
        spread = f" ({r['far_range']}, {r['seeds']} seeds)" if r["seeds"] > 1 else ""
        spread += old
        if r["refused"]:
            spread += f", refused on {r['refused']} (counted as FAR 100%)"
        return f"{_pct(r['test_frr'])} / {_pct(r['test_far'])}{spread}"

    rows = []
    for (dataset, attack), detectors in by_key.items():
        clean = attack == "clean"
        name = ATTACK_NAMES.get(attack, attack) if clean else f"{attack} ({_pct(asr[(dataset, attack)])})"
        rows.append([dataset, name, *(cell(detectors.get(d), clean) for d in DETECTORS)])
    return _table(["dataset", "attack (ASR)", *(f"{d} FRR / FAR" for d in DETECTORS)], rows)


def _results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def serving_targets_table() -> str:
    """bench.serving's targets: what was measured against each goal."""
    rows = [[t["target"], t["measured"], t["goal"], t["met"]] for t in _results("serving")["targets"]]
    return _table(["target", "measured", "goal", "met"], rows)


def serving_detectors_table() -> str:
    """bench.serving --name serving_detectors: the default detectors vs RAP alone vs bare, per concurrency."""
    return _serving_ratios("serving_detectors", "rap_alone", "RAP alone's")


def serving_reader_table() -> str:
    """bench.serving --name serving_reader: every detector with the reader vs the default two vs bare."""
    return _serving_ratios("serving_reader", "default", "the default two's")


def serving_switch_table() -> str:
    """bench.serving --name serving_switch: every detector of a `--switch` bundle vs rap+features+reader vs bare."""
    return _serving_ratios("serving_switch", "reader", "rap+features+reader's")


def _serving_ratios(name: str, against: str, whose: str) -> str:
    """guarded-lazy per concurrency: throughput and CPU against another guarded server (`against`), CPU
    against (1 + p) x bare, p50 against bare."""
    results = _results(name)
    rows = [
        [r["concurrency"], r["protect_share"], r[f"throughput_vs_{against}"], r[f"cpu_vs_{against}"],
         r["cpu_vs_bare_1p"], r["p50_vs_bare"]]
        for r in results["ratios"]
        if r["server"] == "guarded-lazy"
    ]  # fmt: skip
    columns = ["concurrency", "p (protect share)", f"throughput / {whose}", f"CPU / {whose}", "CPU / ((1+p) x bare)",
               "p50 / bare p50"]  # fmt: skip
    settings = results["settings"]
    return f"Bundle `{settings['bundle']}`, backend onnx-opt, {settings['rounds']} rounds.\n\n{_table(columns, rows)}"


def repair_table() -> str:
    """bench.repair: residual ASR per attack and defence (guard rows: test FRR at the 1% target), and CACC."""
    rows = _results("repair")["rows"]
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    by_attack: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_attack.setdefault(r["attack"], {})[r["defence"]] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        frr = f" (FRR {_pct(r['test_frr'])})" if r.get("test_frr") is not None else ""
        return f"{_pct(r['residual_asr'])}{frr}"

    out = [[attack, *(cell(d.get(x)) for x in defences)] for attack, d in by_attack.items()]
    out += [[f"CACC, {attack}", *(_pct(d[x]["cacc"]) if x in d else "–" for x in defences)]
            for attack, d in by_attack.items()]  # fmt: skip
    return _table(["attack", *defences], out)


def inversion_scan_table() -> str:
    """bench.inversion: the scan's suspect pair and trigger per model, and its verdict at its own threshold."""
    rows = []
    for r in _results("inversion")["scan"]:
        planted = " / ".join(r["true_trigger"]) if isinstance(r["true_trigger"], list) else r["true_trigger"] or ""
        flagged = "yes" if r["verdict_scan"] else "no"
        truth = "backdoored" if r["backdoored"] else "clean"
        rows.append(
            [r["model"], truth, planted, f"{r['found_pair']} `{r['found_trigger']}`", f"{r['loss']:.3f}", flagged]
        )
    columns = ["model", "truth", "planted trigger", "suspect pair, found trigger", "loss",
               f"flagged at {_results('inversion')['scan'][0]['scan_threshold']}"]  # fmt: skip
    return _table(columns, rows)


def inversion_repair_table() -> str:
    """bench.inversion: unlearning and hardening, before -> after."""
    rows = []
    for r in _results("inversion")["repair"]:
        what = ", ".join(r.get("triggers", [])) or "–"
        eps = f"{r['eps_ma2_before']:.2f} -> {r['eps_ma2_after']:.2f}" if "eps_ma2_before" in r else "–"
        asr = f"{_pct(r['asr_before'])} -> {_pct(r['asr_after'])}"
        cacc = f"{_pct(r['cacc_before'])} -> {_pct(r['cacc_after'])}"
        rows.append([r["model"], r["method"], what, asr, cacc, eps])
    return _table(["model", "method", "unlearned", "ASR before -> after", "CACC before -> after", "eps-mA²"], rows)


def robustness_table() -> str:
    """bench.robustness: per kind of attempt, the cases, requests sent and failures (a promise broken)."""
    kinds: dict[str, list[dict]] = {}
    for case in _results("robustness")["cases"]:
        kinds.setdefault(case["kind"], []).append(case)
    rows = [
        [kind, len(cases), sum(c["sent"] for c in cases), sum(c["failures"] for c in cases)]
        for kind, cases in kinds.items()
    ]
    return _table(["kind", "cases", "requests sent", "failures"], rows)


def overload_table() -> str:
    """bench.robustness: offered load against the measured capacity, and how it was answered."""
    rows = []
    for case in _results("robustness")["cases"]:
        if case["kind"] != "overload":
            continue
        d = case["detail"]
        offered = f"{d['offered_rps']:.0f} ({d['offered_rps'] / d['capacity_rps']:.1f}x)"
        p99 = [f"{d['admitted_p99_ms']:.0f}", f"{d['refused_p99_ms']:.0f}"]
        rows.append([case["case"], offered, d["sent"], _pct(d["429"] / d["sent"]), d["503"], d["lost"], *p99])
    columns = ["case", "offered rps (x capacity)", "sent", "429", "503", "lost", "admitted p99 ms", "429 p99 ms"]
    return _table(columns, rows)


# What tests/integration/test_families.py verified on each family's tiny offline fixture (the whole chain:
# calibrate rap --int8 -> guard verify -> guard check (fp32 and int8) -> guard serve standalone and sidecar ->
# calibrate evaluate); efficacy on real data is measured on MiniLM only.
VERIFIED = {
    "BERT": "the whole chain; efficacy on the real MiniLM (benchmarks)",
    "ModernBERT": "the whole chain (mean pooling read)",
}


def families_table() -> str:
    """guard.core.family's support matrix: per family, its graphs, repairs and what was verified."""
    from guard.core.family import FAMILIES, REPAIRS

    rows = []
    for f in FAMILIES:
        optimised = f.optimizer or "none (`model.onnx` served)"
        int8 = "plain, optimised" if f.optimizer else "plain"
        repairs = ", ".join(name for key, name in REPAIRS.items() if key in f.repairs)
        types = "per config" if f.name.startswith("DeBERTa") else ("yes" if f.token_types else "no")
        rows.append([f.name, types, optimised, int8, repairs, VERIFIED.get(f.name, "the whole chain")])
    columns = ["family", "token types", "optimised graph", "int8 graphs", "repairs and scans", "verified here"]
    return _table(columns, rows)


def alerts() -> list[str]:
    """The alert names of deploy/prometheus/rules.yml, in file order."""
    import yaml

    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "metrics": metrics_table,
    "cli": cli_reference,
    "headline": headline_table,
    "detection-matrix": detection_matrix_table,
    "serving-targets": serving_targets_table,
    "serving-detectors": serving_detectors_table,
    "serving-reader": serving_reader_table,
    "serving-switch": serving_switch_table,
    "repair": repair_table,
    "inversion-scan": inversion_scan_table,
    "inversion-repair": inversion_repair_table,
    "robustness": robustness_table,
    "overload": overload_table,
    "families": families_table,
    "adaptive": adaptive_table,
    "adaptive-summary": adaptive_summary,
    "reference": reference_table,
    "reader": reader_table,
    "reader-texts": reader_texts_table,
    "rap-position": rap_position_table,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.gen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only list stale pages (exit 1 if any)")
    args = parser.parse_args(argv)
    changed = stale()
    for path in changed:
        print(f"{'stale' if args.check else 'rewrote'}: {path.relative_to(ROOT)}")
        if not args.check:
            path.write_text(render(path.read_text()))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
