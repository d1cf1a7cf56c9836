"""Load labelled text rows from TSV, CSV or JSONL files, and unlabeled texts (`load_texts`).

TSV: header `text<TAB>label`, split on the LAST tab, no quote handling (the
common research format; texts often contain `"`). CSV: header with `text` and
`label` columns, standard quoting. JSONL: one object per line with `text` and
`label`. Labels are integers (or digit strings).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from guard.core.errors import InputError
from guard.core.types import Example

FORMATS = (".tsv", ".csv", ".jsonl")


def load_examples(path: Path) -> list[Example]:
    """Read every row of a data file; raise InputError naming the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    readers = {".tsv": _read_tsv, ".csv": _read_csv, ".jsonl": _read_jsonl}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InputError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    try:
        rows = list(reader(path))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}:{_bad_utf8_line(path)}: not UTF-8 text ({exc.reason})") from exc
    if not rows:
        raise InputError(f"{path}: no data rows")
    return rows


def load_texts(path: Path) -> list[str]:
    """Unlabeled texts: a .txt file's non-empty lines (one text per line), or the texts of any file
    `load_examples` reads (their labels are not used); raise InputError naming the first bad row."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        return [row.text for row in load_examples(path)]
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # only LF (and CRLF) end a line, as in a TSV
        texts = [line.removesuffix("\r") for line in lines if line.strip()]
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}:{_bad_utf8_line(path)}: not UTF-8 text ({exc.reason})") from exc
    if not texts:
        raise InputError(f"{path}: no texts")
    return texts


def _bad_utf8_line(path: Path) -> int:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return raw.count(b"\n", 0, exc.start) + 1
    return 0


def label_counts(examples: Iterable[Example]) -> dict[int, int]:
    return dict(sorted(Counter(e.label for e in examples).items()))


def write_tsv(path: Path, examples: Iterable[Example]) -> None:
    examples = list(examples)
    for i, e in enumerate(examples):
        if "\n" in e.text or "\r" in e.text:  # a tab is fine: readers split on the last one
            raise InputError(f"row {i}: a TSV text cannot contain a line break")
    lines = ["text\tlabel"] + [f"{e.text}\t{e.label}" for e in examples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _row(path: Path, line_no: int, text: object, label: object) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{path}:{line_no}: empty or missing text")
    if isinstance(label, str) and label.strip().isdecimal():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise InputError(f"{path}:{line_no}: label {label!r} is not a non-negative integer")
    return Example(text=text, label=label)


def _read_tsv(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        lines = (line.rstrip("\n").rstrip("\r") for line in f)
        header = next(lines, None)
        if header is None or header.split("\t") != ["text", "label"]:
            raise InputError(f"{path}:1: expected the header 'text<TAB>label', got {header!r}")
        for line_no, line in enumerate(lines, start=2):
            if not line:
                continue
            if "\t" not in line:
                raise InputError(f"{path}:{line_no}: no TAB between text and label")
            text, label = line.rsplit("\t", 1)
            yield _row(path, line_no, text, label)


def _read_csv(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise InputError(f"{path}:1: expected a header with 'text' and 'label' columns, got {reader.fieldnames}")
        for record in reader:  # line_num counts physical lines: quoted fields may span several
            yield _row(path, reader.line_num, record.get("text"), record.get("label"))


def _read_jsonl(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object with 'text' and 'label'")
            yield _row(path, line_no, record.get("text"), record.get("label"))
