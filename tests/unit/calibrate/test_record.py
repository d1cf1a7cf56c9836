"""Output folders: --force replaces a folder, but never the input model or the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibrate.record import check_replaceable, prepare_out_dir
from guard.core.errors import InputError


def _model(parent: Path) -> Path:
    model = parent / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return model


def test_force_replaces_an_ordinary_folder(tmp_path: Path) -> None:
    model, out = _model(tmp_path / "in"), tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    prepare_out_dir(model, out, force=True)
    assert not out.exists() and (model / "config.json").is_file()


def test_force_never_deletes_a_folder_holding_the_input_model(tmp_path: Path) -> None:
    model = _model(tmp_path / "work")
    with pytest.raises(InputError, match="holds the input model; --force will not delete it"):
        prepare_out_dir(model, tmp_path / "work", force=True)
    assert (model / "config.json").is_file()


def test_force_never_deletes_the_input_model(tmp_path: Path) -> None:
    model = _model(tmp_path)
    with pytest.raises(InputError, match="is the input model"):
        prepare_out_dir(model, model, force=True)
    assert (model / "config.json").is_file()


def test_force_never_deletes_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cwd = _model(tmp_path / "a"), tmp_path / "b" / "here"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    for out in (Path("."), tmp_path / "b"):  # the working directory itself, and a folder above it
        with pytest.raises(InputError, match="the working directory; --force will not delete it"):
            prepare_out_dir(model, out, force=True)
    assert (cwd / "notes.txt").is_file()


def test_check_replaceable_lets_a_sibling_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_replaceable(tmp_path / "bundle", (tmp_path / "model",))
