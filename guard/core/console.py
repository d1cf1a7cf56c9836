"""What both command-line tools share: one-line errors, logging set-up, argparse style."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from guard.core.errors import GuardError

log = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and help that keeps the examples' layout."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "torch", "onnxruntime", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


def run(prog: str, command: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command; expected failures become `prog: error: ...` and exit 1, never a traceback."""
    try:
        return command() or 0
    except GuardError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{prog}: error:{where}: {exc.strerror or exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as exc:  # last resort: one line for the user, the traceback for --debug
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)\n")
        return 1
