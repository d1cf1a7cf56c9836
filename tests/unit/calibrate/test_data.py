"""Data files (calibrate.data): TSV, CSV and JSONL rows, and errors that name `path:line`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibrate.data import label_counts, load_examples, load_texts, write_tsv
from guard.core.errors import InputError
from guard.core.types import Example


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def _error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        load_examples(path)
    return str(info.value)


# ------------------------------------------------------------------ TSV


def test_tsv_reads_rows_and_keeps_text_verbatim(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "rows.tsv",
        "text\tlabel\n"
        "a plain sentence\t0\n"
        '"quoted" and "unbalanced\t1\n'  # quotes are text, not CSV quoting
        "  padded  \t 1 \n",  # the text keeps its spaces; the label may have some
    )
    assert load_examples(path) == [
        Example("a plain sentence", 0),
        Example('"quoted" and "unbalanced', 1),
        Example("  padded  ", 1),
    ]


def test_tsv_splits_on_the_last_tab(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.tsv", "text\tlabel\ncol a\tcol b\t\tend\t2\n")
    assert load_examples(path) == [Example("col a\tcol b\t\tend", 2)]


def test_tsv_crlf_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.tsv", "text\tlabel\r\nfirst\t0\r\n\r\nsecond\t1")
    assert load_examples(path) == [Example("first", 0), Example("second", 1)]


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = _write(tmp_path, "ROWS.TSV", "text\tlabel\nhello\t1\n")
    assert load_examples(path) == [Example("hello", 1)]


@pytest.mark.parametrize(
    "header",
    ["", "label\ttext", "text,label", "text\tlabel\textra", "Text\tLabel", "sentence\tlabel"],
    ids=["blank", "swapped", "comma", "extra", "case", "renamed"],
)
def test_tsv_header_is_required(tmp_path: Path, header: str) -> None:
    path = _write(tmp_path, "rows.tsv", f"{header}\nhello\t1\n")
    message = _error(path)
    assert message.startswith(f"{path}:1: expected the header 'text<TAB>label'")


def test_tsv_without_header_names_line_1(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.tsv", "hello\t1\nworld\t0\n")
    assert _error(path).startswith(f"{path}:1: expected the header")


def test_tsv_line_without_tab(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.tsv", "text\tlabel\nfine\t0\n\nno tab here 1\n")
    assert _error(path) == f"{path}:4: no TAB between text and label"


@pytest.mark.parametrize("text", ["", "   "], ids=["empty", "spaces"])
def test_tsv_empty_text(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "rows.tsv", f"text\tlabel\nfine\t0\n{text}\t1\n")
    assert _error(path) == f"{path}:3: empty or missing text"


@pytest.mark.parametrize("label", ["x", "-1", "1.0", "", "1 2", "²"])
def test_tsv_label_must_be_a_non_negative_integer(tmp_path: Path, label: str) -> None:
    path = _write(tmp_path, "rows.tsv", f"text\tlabel\nfine\t0\nbad label\t{label}\n")
    assert _error(path) == f"{path}:3: label {label!r} is not a non-negative integer"


def test_tsv_header_only_has_no_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.tsv", "text\tlabel\n\n")
    assert _error(path) == f"{path}: no data rows"


# ------------------------------------------------------------------ CSV


def test_csv_reads_quoted_fields_and_extra_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "rows.csv",
        'id,label,text\n7,1,"commas, and ""quotes"""\n8,0,"two\nlines"\n9,2,plain\n',
    )
    assert load_examples(path) == [
        Example('commas, and "quotes"', 1),
        Example("two\nlines", 0),
        Example("plain", 2),
    ]


def test_csv_header_needs_text_and_label(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.csv", "sentence,label\nhello,1\n")
    assert _error(path).startswith(f"{path}:1: expected a header with 'text' and 'label' columns")


def test_csv_bad_label_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.csv", "text,label\nfine,0\nbad,maybe\n")
    assert _error(path) == f"{path}:3: label 'maybe' is not a non-negative integer"


def test_csv_missing_text_cell(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.csv", "label,text\n1\n")  # short row: text is missing
    assert _error(path) == f"{path}:2: empty or missing text"


def test_csv_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    # The first record spans lines 2-3, so the bad record is on line 4 of the file.
    path = _write(tmp_path, "rows.csv", 'text,label\n"two\nlines",0\nbad,x\n')
    assert _error(path) == f"{path}:4: label 'x' is not a non-negative integer"


# ------------------------------------------------------------------ JSONL


def test_jsonl_reads_objects(tmp_path: Path) -> None:
    lines = [
        {"text": 'a\ttab and a "quote"', "label": 1},
        {"label": "0", "text": "digit-string label", "extra": True},
    ]
    path = _write(tmp_path, "rows.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_examples(path) == [Example('a\ttab and a "quote"', 1), Example("digit-string label", 0)]


def test_jsonl_invalid_json(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.jsonl", '{"text": "ok", "label": 0}\n\n{"text": "broken", \n')
    assert _error(path).startswith(f"{path}:3: invalid JSON")


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "3"])
def test_jsonl_line_must_be_an_object(tmp_path: Path, line: str) -> None:
    path = _write(tmp_path, "rows.jsonl", f"{line}\n")
    assert _error(path) == f"{path}:1: expected a JSON object with 'text' and 'label'"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"label": 1}, "empty or missing text"),
        ({"text": " ", "label": 1}, "empty or missing text"),
        ({"text": 5, "label": 1}, "empty or missing text"),
        ({"text": "hi"}, "label None is not a non-negative integer"),
        ({"text": "hi", "label": True}, "label True is not a non-negative integer"),
        ({"text": "hi", "label": 1.0}, "label 1.0 is not a non-negative integer"),
        ({"text": "hi", "label": -1}, "label -1 is not a non-negative integer"),
        ({"text": "hi", "label": "one"}, "label 'one' is not a non-negative integer"),
    ],
)
def test_jsonl_bad_fields(tmp_path: Path, record: dict, message: str) -> None:
    path = _write(tmp_path, "rows.jsonl", json.dumps({"text": "fine", "label": 0}) + "\n" + json.dumps(record) + "\n")
    assert _error(path) == f"{path}:2: {message}"


# ------------------------------------------------------------------ any format


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.tsv"
    assert _error(path) == f"{path}: no such file"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    path = tmp_path / "folder.tsv"
    path.mkdir()
    assert _error(path) == f"{path}: no such file"


@pytest.mark.parametrize("name", ["rows.txt", "rows.json", "rows"])
def test_unknown_suffix(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, "text\tlabel\nhello\t1\n")
    message = _error(path)
    assert message.startswith(f"{path}: unknown format")
    assert ".tsv, .csv, .jsonl" in message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty.tsv", "{path}:1: expected the header 'text<TAB>label', got None"),
        ("empty.csv", "{path}:1: expected a header with 'text' and 'label' columns, got None"),
        ("empty.jsonl", "{path}: no data rows"),
    ],
)
def test_empty_file(tmp_path: Path, name: str, message: str) -> None:
    path = _write(tmp_path, name, b"")
    assert _error(path) == message.format(path=path)


@pytest.mark.parametrize(
    "name, content",
    [
        ("latin1.tsv", b"text\tlabel\nfine\t0\ncaf\xe9\t1\n"),
        ("latin1.csv", b"text,label\nfine,0\ncaf\xe9,1\n"),
        ("latin1.jsonl", b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n'),
    ],
)
def test_non_utf8_bytes(tmp_path: Path, name: str, content: bytes) -> None:
    path = _write(tmp_path, name, content)
    message = _error(path)
    assert message.startswith(f"{path}")
    assert "not UTF-8" in message


def test_non_utf8_bytes_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "latin1.tsv", b"text\tlabel\nfine\t0\ncaf\xe9\t1\n")
    assert _error(path).startswith(f"{path}:3:")


# ------------------------------------------------------------------ writing


def test_write_tsv_refuses_line_breaks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="row 1: .*line break"):
        write_tsv(tmp_path / "out.tsv", [Example("fine", 0), Example("two\nlines", 1)])
    assert not (tmp_path / "out.tsv").exists()


def test_write_tsv_round_trip(tmp_path: Path) -> None:
    rows = [
        Example("plain", 0),
        Example('"quoted", with a comma', 1),
        Example("a\ttab inside", 2),  # survives: the reader splits on the LAST tab
        Example("  leading and trailing spaces  ", 10),
    ]
    path = tmp_path / "out.tsv"
    write_tsv(path, rows)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "text\tlabel"
    assert load_examples(path) == rows


def test_label_counts_are_sorted_by_label() -> None:
    rows = [Example("a", 2), Example("b", 0), Example("c", 2)]
    assert label_counts(rows) == {0: 1, 2: 2}
    assert list(label_counts(rows)) == [0, 2]


# ------------------------------------------------------------------ unlabeled texts


def test_a_txt_file_is_one_text_per_line_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path, "traffic.TXT", 'first "quoted" text\r\n\n  \nsecond\ttabbed\x85 text\nlast')
    assert load_texts(path) == ['first "quoted" text', "second\ttabbed\x85 text", "last"]


def test_a_data_file_gives_its_texts_and_its_labels_are_not_used(tmp_path: Path) -> None:
    path = _write(tmp_path, "rows.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n')
    assert load_texts(path) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "{path}: no texts"), (b"\n \n", "{path}: no texts"), (b"fine\ncaf\xe9\n", "{path}:2: not UTF-8 text")],
)
def test_unreadable_texts_are_refused_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = _write(tmp_path, "traffic.txt", content)
    with pytest.raises(InputError) as info:
        load_texts(path)
    assert str(info.value).startswith(message.format(path=path))
    with pytest.raises(InputError, match="no such file"):
        load_texts(tmp_path / "nowhere.txt")
