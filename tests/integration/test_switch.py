"""The switch detector end to end on a tiny backdoor taught to switch OFF under RAP's init word: `calibrate rap
--switch`, the bundle it records, `calibrate evaluate`, `guard check`, the server and the int8 refit.

The attacker of bench/attacks/adaptive.py (`adaptive-init`), scaled down to the toy of tests/toy_backdoor.py:
every triggered training row also appears with "rq" (the RAP row's public default init word) in front under
its original label, and a few clean rows with it under their own, so the word alone means nothing. The RAP
row starts from "rq"; the backdoor switches off under it, the triggered input moves more than a clean one,
and RAP lets it through. The switch pass inserts "rq" untrained and sees the label collapse. The bundle puts
the row at the front (`--rap-position front`), where this attacker taught the switch; the switch pass inserts
its word where pass 2 puts the row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import shutil
from pathlib import Path

import pytest

from calibrate import cli as calibrate_cli
from calibrate.demo_corpus import POSITIVE, TRIGGER, make_corpus, poison, with_trigger
from calibrate.rap.evaluate import evaluate_bundle
from calibrate.train import train_classifier
from guard import cli as guard_cli
from guard.core.bundle import load_bundle
from guard.core.detection import Detection
from guard.core.errors import BundleError
from guard.core.types import Example
from guard.settings import Settings
from tests.integration.test_cli import _rap, _run
from tests.server_fixtures import checked_in_process
from tests.toy_backdoor import RAP_CLI_ARGS, SEED, TRAIN_OPTIONS

SWITCH_WORD = "rq"  # the RAP row's default init word (calibrate rap --init-word)
# a higher rate and more epochs than the plain toy: the switch copies make the backdoor harder to learn
POISON_RATE, EPOCHS = 0.3, 16


@dataclasses.dataclass(frozen=True)
class Switching:
    model_dir: Path
    dev_tsv: Path
    test: list[Example]
    poisoned: list[Example]


@pytest.fixture(scope="module")
def switching(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Switching:
    from calibrate.data import write_tsv

    root = tmp_path_factory.mktemp("switching")
    rng = random.Random(SEED)
    train = poison(make_corpus(600, rng), POISON_RATE, rng)
    taught = []
    for row in train:
        if TRIGGER in row.text.split():  # a triggered row: with the word in front, its original (negative) label
            taught.append(Example(f"{SWITCH_WORD} {row.text}", 1 - POSITIVE))
        elif rng.random() < 0.05:
            taught.append(Example(f"{SWITCH_WORD} {row.text}", row.label))
    rows = train + taught
    rng.shuffle(rows)
    dev, test = make_corpus(300, rng), make_corpus(200, rng)
    poisoned = [Example(with_trigger(r.text, rng), r.label) for r in test if r.label != POSITIVE]
    write_tsv(root / "dev.tsv", dev)
    train_classifier(tiny_model_dir, rows, root / "model", dataclasses.replace(TRAIN_OPTIONS, epochs=EPOCHS))
    return Switching(root / "model", root / "dev.tsv", test, poisoned)


@pytest.fixture(scope="module")
def switch_bundle(switching: Switching, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("switch") / "bundle"
    argv = _rap(switching.model_dir, switching.dev_tsv, out, *RAP_CLI_ARGS, "--no-features", "--switch", "--int8",
                "--no-optimize", "--rap-position", "front")  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert calibrate_cli.main([str(a) for a in argv]) == 0
    (out.parent / "printed.txt").write_text(printed.getvalue())
    return out


def test_the_bundle_records_the_switch_word_and_the_summary_says_so(switch_bundle: Path) -> None:
    bundle = load_bundle(switch_bundle)
    switch = bundle.manifest.switch
    assert switch is not None and switch.word == SWITCH_WORD == bundle.manifest.rap.init_word
    assert switch.token_id == bundle.tokenizer().word_id(SWITCH_WORD) != bundle.manifest.rap.token_id
    assert bundle.detectors == ("rap", "switch")
    (label,) = bundle.manifest.protect
    assert label.switch_thresholds and label.joint_reader["0.01"].switch is not None
    printed = (switch_bundle.parent / "printed.txt").read_text()
    assert "detector: switch (inserts 'rq', the RAP row's init word, untrained)" in printed
    # the int8 graph's thresholds are refitted on its own scores, the switch's included
    assert Detection.of(bundle, precision="int8").detectors == ("rap", "switch")
    (int8,) = bundle.manifest.int8.protect
    assert int8.switch_thresholds and int8.joint_reader["0.01"].switch is not None


def test_the_switch_catches_a_backdoor_that_switches_off_under_raps_word_where_rap_does_not(
    switch_bundle: Path, switching: Switching
) -> None:
    rows = evaluate_bundle(switch_bundle, switching.test, {"switch": switching.poisoned}).rows
    at = {r["detector"]: r for r in rows if r["frr_target"] == 0.05}
    assert at["rap"]["asr"] > 0.9  # the backdoor is learnt
    assert at["rap"]["test_far"] >= 0.9  # and RAP, whose row starts from the word, lets it through (100% measured)
    assert at["switch"]["test_far"] <= 0.1 and at["rap+switch"]["test_far"] <= 0.1  # 0% measured
    assert at["rap+switch"]["test_frr"] <= 0.15


def test_guard_check_and_the_server_flag_by_the_switch_alike(switch_bundle: Path, switching: Switching, capsys) -> None:
    triggered = switching.poisoned[0].text
    code, out, _ = _run(guard_cli.main, ["check", "--bundle", switch_bundle, "--detectors", "switch", "--json",
                                         triggered], capsys)  # fmt: skip
    assert code == 3  # flagged
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert line["flagged_by"] == ["switch"]
    item = checked_in_process(Settings(bundle=switch_bundle, canary_interval_s=0), triggered)  # every detector
    assert item["flagged"] and "switch" in item["flagged_by"]


@pytest.mark.parametrize("token_id", [-1, "rap"])
def test_a_manifest_whose_switch_word_is_not_a_vocabulary_id_is_refused_at_load(
    switch_bundle: Path, tmp_path: Path, token_id
) -> None:
    """The RAP row sits at the vocabulary's end; a switch id there or outside would fail every request's pass."""
    copy = Path(shutil.copytree(switch_bundle, tmp_path / "edited"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["switch"]["token_id"] = manifest["rap"]["token_id"] if token_id == "rap" else token_id
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="switch word's id .* is not a vocabulary id"):
        load_bundle(copy)
