"""Just enough of a Dockerfile reader to run an image's own commands outside Docker.

CI has no Docker engine. Instead of restating the image's install and start-up steps
(which would drift), tests read them from the Dockerfile: stages, ARG defaults, ENV,
COPY, RUN, ENTRYPOINT/CMD and the HEALTHCHECK command, with image paths mapped to
temporary directories by `PathMap`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name!r} has no {keyword}"
        return found[-1]

    def args(self, global_args: dict[str, str]) -> dict[str, str]:
        """ARG defaults visible in this stage (a bare `ARG X` re-imports a global one)."""
        values: dict[str, str] = {}
        for instruction in self.all("ARG"):
            name, _, default = instruction.args.partition("=")
            values[name] = default if default else global_args.get(name, "")
        return values

    def env(self, base: dict[str, str], args: dict[str, str] | None = None) -> dict[str, str]:
        """`base` updated with the stage's ENV lines, `$VAR` expanded as Docker does (ENV, then ARG)."""
        env = dict(base)
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.args):
                name, _, value = pair.partition("=")
                env[name] = expand(value, {**(args or {}), **env})
        return env


@dataclass(frozen=True)
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in _logical_lines(path.read_text(encoding="utf-8")):
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=name.strip() or str(len(stages))))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of ENTRYPOINT/CMD, or of HEALTHCHECK's CMD after its options."""
    text = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        text = text[text.index(" CMD ") + len(" CMD ") :]
    command = json.loads(text)
    assert isinstance(command, list) and all(isinstance(x, str) for x in command), instruction
    return command


def expand(text: str, values: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


@dataclass(frozen=True)
class PathMap:
    """Image paths -> directories on this machine (longest prefix wins)."""

    mapping: dict[str, Path]

    def __call__(self, text: str) -> str:
        for prefix in sorted(self.mapping, key=len, reverse=True):
            if text == prefix or text.startswith(prefix + "/"):
                return str(self.mapping[prefix]) + text[len(prefix) :]
        return text

    def paths(self, value: str) -> str:
        """Map every element of a colon-separated list (PATH-like values)."""
        return ":".join(self(part) for part in value.split(":"))


def _logical_lines(text: str):
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        yield keyword.upper(), args.strip()
