"""`calibrate demo`: the offline end-to-end demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate.cli.args import command, defaults
from calibrate.options import DemoOptions

DESCRIPTION = (
    "Write a small sentiment corpus, fine-tune the packaged MiniLM on it with a planted\n"
    "rare-word backdoor, calibrate a RAP guard bundle, evaluate it, show a clean sentence\n"
    "passing and a triggered one flagged, then serve the bundle with `guard serve` and send\n"
    "one allowed and one blocked request; it keeps serving until Ctrl-C (--no-serve: stop).\n"
    "No data or network needed.\n\n"
    "  calibrate demo              # build, check, then serve on port 8000 until Ctrl-C\n"
    "  calibrate demo --no-serve   # stop after the offline checks"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = defaults(DemoOptions)
    p = command(sub, "demo", "offline end-to-end demo on a corpus it writes itself", DESCRIPTION)
    p.add_argument("--out", type=Path, default=d.out, help="working directory")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--port", type=int, default=d.port, help="port of the demo guard server")
    p.add_argument("--no-serve", action="store_true", help="stop after the offline checks; start no server")
    p.set_defaults(handler=_demo, uses_torch=True)


def _demo(args: argparse.Namespace) -> int:
    from calibrate.demo import run_demo

    run_demo(args.out, seed=args.seed, port=None if args.no_serve else args.port)
    return 0
