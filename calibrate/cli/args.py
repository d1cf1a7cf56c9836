"""What every `calibrate` command module shares: argument types, help that shows every
default, and defaults read from the options dataclasses (so the CLI cannot drift from them)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from types import SimpleNamespace

from guard.console import Parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and appends `(default: X)` to every option that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default in (None, False, (), argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def command(sub: argparse._SubParsersAction, name: str, help: str, description: str) -> Parser:
    """A sub-command parser whose help lists every default."""
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def defaults(cls: type) -> SimpleNamespace:
    """The field defaults of an options dataclass (default factories called), by name."""
    values = {}
    for f in fields(cls):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    return SimpleNamespace(**values)


def options_from(cls: type, args: argparse.Namespace, **overrides):
    """`cls` built from the parsed arguments whose names are its fields (dests match field names)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def add_learning_rate(p: argparse.ArgumentParser, default: float, help: str = "learning rate") -> None:
    """--lr, stored as `learning_rate` (the options' field name)."""
    p.add_argument("--lr", dest="learning_rate", metavar="LR", type=positive_float, default=default, help=help)


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def weight(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a weight between 0 and 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
