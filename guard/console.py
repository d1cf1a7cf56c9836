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


def command_parser(prog: str, description: str) -> tuple[Parser, argparse._SubParsersAction]:
    """A top-level parser with the shared -v/--debug flags, and its sub-command group."""
    parser = Parser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return parser, parser.add_subparsers(title="commands", metavar="COMMAND")


def dispatch(
    parser: Parser, argv: list[str] | None, prepare: Callable[[argparse.Namespace], None] | None = None
) -> int:
    """Parse, set up logging, run the chosen sub-command's handler under `run`."""
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    if prepare is not None:
        prepare(args)
    return run(parser.prog, lambda: args.handler(args), debug=args.debug)
