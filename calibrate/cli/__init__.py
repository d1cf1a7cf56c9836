"""`calibrate`: offline commands. Each one parses, builds options, calls one function.

One module per command group: train.py (train), repair.py (prune, maxent),
inversion.py (scan, unlearn, harden), rap.py (rap, evaluate), demo.py. Defaults are
read from the options dataclasses (cli/args.py), the work is done by the `run_...`
function next to the code it drives.
"""

from __future__ import annotations

import argparse

from calibrate.cli import demo, inversion, rap, repair, train
from guard.console import Parser, command_parser, dispatch
from guard.core.family import support_matrix

DESCRIPTION = """\
Turn a fine-tuned text classifier you did not train into a verified guard bundle.

  calibrate demo                                   # everything end-to-end, offline, ~3 min
  calibrate train --data train.tsv --out model/    # fine-tune a classifier (demos, benchmarks)
  calibrate prune --model model/ --data clean.tsv --dev dev.tsv --out repaired/   # optional repair: PURE
  calibrate maxent --model model/ --data clean.tsv --out repaired/                # optional repair: MEFT
  calibrate scan --model model/ --clean dev.tsv --out scan.json                   # backdoored? trigger? (DBS)
  calibrate unlearn --model model/ --clean dev.tsv --scan scan.json --out repaired/   # repair: unlearn it
  calibrate harden --model model/ --clean dev.tsv --out hardened/                 # repair: hardening
  calibrate rap --model model/ --clean dev.tsv --protect 1 --out bundle/
  calibrate evaluate --bundle bundle/ --clean test.tsv --poisoned badnet=poison.tsv

Data files: .tsv (header 'text<TAB>label'), .csv (columns text,label) or .jsonl
({"text": ..., "label": ...}); labels are integer class ids.

Encoder families: `calibrate rap`, `guard serve` and `calibrate evaluate` take every one below;
the repairs and scans each take these:
{families}
"""
GROUPS = (train, repair, inversion, rap, demo)  # in the order `calibrate --help` lists them


def main(argv: list[str] | None = None) -> int:
    return dispatch(_parser(), argv, prepare=_quiet)


def _quiet(args: argparse.Namespace) -> None:
    if getattr(args, "uses_torch", False) and not args.verbose:  # keep torch off the path of the others
        from calibrate.model import quiet_transformers

        quiet_transformers()


def _parser() -> Parser:
    parser, sub = command_parser("calibrate", DESCRIPTION.replace("{families}", support_matrix()))
    for group in GROUPS:
        group.add_commands(sub)
    return parser
