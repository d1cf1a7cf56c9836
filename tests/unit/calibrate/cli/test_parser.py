"""The `calibrate` parser alone (no command runs): defaults, help, --protect."""

from __future__ import annotations

import argparse

import pytest

from calibrate.cli import _parser
from calibrate.cli.args import HelpFormatter
from calibrate.inversion.options import HardenOptions, ScanOptions, UnlearnJob, UnlearnOptions
from calibrate.options import TrainOptions
from calibrate.rap.options import CalibrateOptions, RapOptions
from calibrate.repair.options import MaxEntOptions, PruneOptions


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_shows_every_default(name: str) -> None:
    parser = _commands()[name]
    formatter = HelpFormatter(prog=parser.prog)
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, (), argparse.SUPPRESS):
            assert "(default: " in formatter._get_help_string(action), (name, action.dest)
    assert parser.formatter_class is HelpFormatter


def test_train_help_shows_epochs_batch_size_and_seed(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("train", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS training epochs (default: 3)" in out
    assert "rows per training step (default: 32)" in out
    assert "random seed (default: 13)" in out


def test_defaults_are_the_options_dataclasses() -> None:
    train = _parse("train", "--data", "d.tsv", "--out", "o")
    t = TrainOptions()
    assert (train.epochs, train.learning_rate, train.batch_size, train.max_length, train.seed) == (
        t.epochs,
        t.learning_rate,
        t.batch_size,
        t.max_length,
        t.seed,
    )
    prune = _parse("prune", "--model", "m", "--data", "d", "--dev", "v", "--out", "o")
    assert (prune.max_accuracy_drop, prune.mu, prune.heads_per_step) == (
        0.05,
        PruneOptions().mu,
        PruneOptions().heads_per_step,
    )
    maxent = _parse("maxent", "--model", "m", "--data", "d", "--out", "o")
    assert (maxent.max_steps, maxent.maxent_lr) == (MaxEntOptions().max_steps, MaxEntOptions().learning_rate)
    scan = _parse("scan", "--model", "m", "--clean", "c")
    assert (scan.steps, scan.trigger_length) == (ScanOptions().inversion.steps, ScanOptions().trigger_length)
    unlearn = _parse("unlearn", "--model", "m", "--clean", "c", "--out", "o", "--scan", "s")
    assert (unlearn.epochs, unlearn.rescans) == (UnlearnOptions().epochs, UnlearnJob(None, None, None).rescans)
    harden = _parse("harden", "--model", "m", "--clean", "c", "--out", "o")
    assert (harden.steps, harden.learning_rate) == (HardenOptions().inversion.steps, HardenOptions().learning_rate)
    rap = _parse("rap", "--model", "m", "--clean", "c", "--out", "o")
    assert (rap.epochs, rap.init_word) == (RapOptions(()).epochs, RapOptions(()).init_word)
    assert rap.max_length == CalibrateOptions(RapOptions(())).max_length


@pytest.mark.parametrize(
    "protect", [["--protect", "0", "2"], ["--protect", "0", "--protect", "2"], ["--protect", "0", "2", "--int8"]]
)
def test_protect_takes_several_labels_either_way(protect: list[str]) -> None:
    assert _parse("rap", "--model", "m", "--clean", "c", "--out", "o", *protect).protect == [0, 2]


def test_protect_is_optional() -> None:
    assert _parse("rap", "--model", "m", "--clean", "c", "--out", "o").protect is None


def test_a_bad_protect_label_points_at_the_rap_help(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("rap", "--model", "m", "--clean", "c", "--out", "o", "--protect", "0", "x")
    assert capsys.readouterr().err.startswith("calibrate rap: error: argument --protect: invalid int value: 'x'")


def test_options_are_built_from_the_arguments_named_after_their_fields() -> None:
    from calibrate.cli.args import options_from

    args = _parse("harden", "--model", "m", "--clean", "c", "--out", "o", "--lr", "3e-5", "--exhaustive-p", "0.2")
    options = options_from(HardenOptions, args, measure=not args.no_measure)
    assert (options.learning_rate, options.exhaustive_probability, options.measure) == (3e-5, 0.2, True)
    assert options.inversion == HardenOptions().inversion  # not an argument: the dataclass default


def test_rap_writes_optimised_graphs_unless_told_not_to() -> None:
    from calibrate.cli.args import options_from

    default = _parse("rap", "--model", "m", "--clean", "c", "--out", "o")
    off = _parse("rap", "--model", "m", "--clean", "c", "--out", "o", "--no-optimize")
    assert default.optimize is True and CalibrateOptions(RapOptions(())).optimize is True
    assert options_from(CalibrateOptions, off, rap=RapOptions(())).optimize is False
