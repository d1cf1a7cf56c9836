"""bench/inversion.py and bench/repair.py on the toy backdoored model with tiny budgets.

Checks the rows each benchmark writes for one model, that a second call is served
from the stage cache (every method is replaced by one that fails), that the
reports render, and the zoo's threshold fitting. The toy's planted trigger is weak
(loss ~0.8, tests/unit/calibrate/test_scan.py), hence the scan threshold of 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import inversion, repair
from bench.inversion_report import fit_threshold, judge, leave_one_out, write_inversion
from bench.repair_report import pivot, target_checks, write_repair
from bench.stages import Case, cached, settings_of
from calibrate.inversion.options import HardenOptions, InversionOptions, ScanOptions, UnlearnOptions
from calibrate.options import TrainOptions
from calibrate.record import REPAIR_RECORD
from calibrate.repair.options import MaxEntOptions, PruneOptions
from tests.toy_backdoor import CALIBRATE_OPTIONS, Toy

MACHINE = {"cpu": "test cpu", "cpu_count": 1}
FINETUNE = TrainOptions(epochs=1, learning_rate=1e-4, batch_size=16, max_length=32, progress=False)
INVERSION_BUDGET = inversion.Budget(
    scan=ScanOptions(
        loss_threshold=1.0,
        rows_per_label=10,
        heldout_per_label=40,
        inversion=InversionOptions(steps=20),
        progress=False,
    ),
    unlearn=UnlearnOptions(epochs=1, learning_rate=1e-3, progress=False),
    rescans=1,
    harden=HardenOptions(
        max_trigger_length=2,
        epochs=1,
        batch_size=8,
        learning_rate=1e-3,
        measure_rows_per_label=5,
        inversion=InversionOptions(steps=4),
        progress=False,
    ),
    harden_rows=60,
    max_length=32,
)
REPAIR_BUDGET = repair.Budget(
    finetune=FINETUNE,
    maxent=MaxEntOptions(
        max_steps=3,
        check_every=1,
        batch_size=16,
        learning_rate=1e-3,
        distance_rows=32,
        head=FINETUNE,
        finetune=FINETUNE,
        progress=False,
    ),
    prune=PruneOptions(finetune=FINETUNE, progress=False),
    calibrate=CALIBRATE_OPTIONS,
    max_length=32,
)
DEFENCES = ["none", "ft", "meft", "pure", "pure+rap"]


@pytest.fixture(scope="module")
def toy_case(backdoored: Toy) -> Case:
    return Case("toy", backdoored.model_dir, True, 1, ["mb"], backdoored.poisoned)


def _fail(*_args, **_kwargs):
    raise AssertionError("recomputed a cached stage")


# ------------------------------------------------------------------ inversion


@pytest.mark.slow
def test_inversion_bench_rows_and_cache(
    toy_case: Case, backdoored: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = inversion.Rows(scan=backdoored.dev, repair=backdoored.dev, test=backdoored.test)
    result = inversion.bench_model(toy_case, rows, INVERSION_BUDGET, tmp_path, harden=True)

    scan = result["scan"]
    assert scan["model"] == "toy" and scan["backdoored"] is True and scan["true_trigger"] == ["mb"]
    assert scan["verdict_scan"] == (scan["loss"] < 1.0) and scan["seconds"] > 0
    assert scan["trigger_recovered"] == (scan["found_trigger"] == "mb")
    assert scan["flagged"], "the toy's trigger is flagged at loss threshold 1.0"
    unlearn, harden = result["repair"]
    for row, method in ((unlearn, "unlearn"), (harden, "harden")):
        assert row["method"] == method and row["model"] == "toy"
        assert all(0 <= row[k] <= 1 for k in ("cacc_before", "cacc_after", "asr_before", "asr_after"))
        assert (tmp_path / "repaired" / f"toy-{method}" / REPAIR_RECORD).is_file()
    assert unlearn["triggers"] and len(unlearn["found_asr_after"]) == len(unlearn["triggers"])
    flagged_texts = [pair.split(" ", 1)[1] for pair in scan["flagged"]]
    assert len(unlearn["rescans"]) == 1 and unlearn["rescans"][0]["unlearned"] == flagged_texts
    assert 0 <= harden["eps_ma2_before"] <= 1 and 0 <= harden["eps_ma2_after"] <= 1 and harden["rounds"] > 0

    for name in ("scan_model", "unlearn_rescanning", "harden_model", "measure", "load_subject"):
        monkeypatch.setattr(inversion, name, _fail)
    assert inversion.bench_model(toy_case, rows, INVERSION_BUDGET, tmp_path, harden=True) == result

    write_inversion(tmp_path / "out", [result], _budget_json(INVERSION_BUDGET, repair=len(rows.repair)), MACHINE)
    payload = json.loads((tmp_path / "out" / "inversion.json").read_text())
    assert set(payload) >= {"machine", "scan", "repair"} and payload["scan"][0]["verdict_loo"] is None
    assert "## Repair" in (tmp_path / "out" / "inversion.md").read_text()


def test_a_stage_is_reused_only_with_the_same_settings(tmp_path: Path) -> None:
    stored = {"settings": settings_of({"options": ScanOptions(trigger_length=1)}), "result": {"old": True}}
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(stored))
    assert cached(path, {"options": ScanOptions(trigger_length=1, progress=False)}, _fail) == {"old": True}
    longer = {"options": ScanOptions(trigger_length=2)}
    assert cached(path, longer, lambda: {"new": True}) == {"new": True}
    assert cached(path, longer, _fail) == {"new": True}
    assert cached(path, longer, lambda: {"newer": True}, produces=[tmp_path / "gone"]) == {"newer": True}
    assert json.loads(path.read_text()) == {"settings": settings_of(longer), "result": {"newer": True}}


def test_fitted_threshold_and_leave_one_out() -> None:
    losses = [0.003, 0.004, 0.5, 0.72, 0.9]
    truth = [True, True, True, False, False]
    threshold = fit_threshold(losses, truth)
    assert 0.5 < threshold < 0.72
    assert fit_threshold([0.003, 0.8], [True, False]) == pytest.approx((0.003 * 0.8) ** 0.5)
    # without the 0.5 model the widest gap (0.004 .. 0.72) decides, and 0.5 lands on the clean side
    verdicts = [verdict for _, verdict in leave_one_out(losses, truth)]
    assert verdicts == [True, True, False, False, False]
    planted = [["mb"], ["cf"], ["a whole sentence"], None, None]
    scanned = [
        {"loss": x, "backdoored": t, "true_trigger": p, "verdict_scan": x < 0.1, "scan_threshold": 0.1}
        for x, t, p in zip(losses, truth, planted, strict=True)
    ]
    rows, summary = judge(scanned)
    assert [r["verdict"] for r in rows] == truth
    assert summary["fitted"]["accuracy"] == 1.0 and summary["leave_one_out"]["accuracy"] == 0.8
    assert summary["scan_threshold"]["tpr"] == pytest.approx(2 / 3) and summary["scan_threshold"]["tnr"] == 1.0
    # the sentence-trigger model is left out of the word-trigger rate: 2 planted words + 2 clean models
    assert summary["word_triggers"] == {"threshold": 0.1, "models": 4, "accuracy": 1.0, "tpr": 1.0, "tnr": 1.0}


# ------------------------------------------------------------------ repair


@pytest.mark.slow
def test_repair_bench_rows_and_cache(
    toy_case: Case, backdoored: Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = backdoored.dev
    rows = repair.Rows(train=dev, prune_dev=dev[:80], rap_dev=dev, test=backdoored.test)
    result = repair.bench_attack(toy_case, rows, REPAIR_BUDGET, tmp_path, DEFENCES)

    assert [r["defence"] for r in result] == DEFENCES
    for row in result:
        assert {"attack", "defence", "cacc", "asr", "residual_asr", "test_frr", "seconds"} <= set(row)
        assert row["attack"] == "toy" and 0 <= row["cacc"] <= 1 and 0 <= row["residual_asr"] <= row["asr"] <= 1
    by = {r["defence"]: r for r in result}
    assert by["ft"]["residual_asr"] == by["ft"]["asr"] and by["ft"]["test_frr"] is None
    assert by["meft"]["details"]["maxent_steps"] == 3 and by["pure"]["details"]["heads"] == 4
    with_rap = by["pure+rap"]
    assert 0 <= with_rap["test_frr"] <= 1 and with_rap["frr_target"] == 0.01
    assert with_rap["seconds"] >= with_rap["repair_seconds"] == by["pure"]["seconds"]
    assert (tmp_path / "repaired" / "toy-pure" / REPAIR_RECORD).is_file()

    for name in ("calibrate_bundle", "evaluate_bundle", "measure", "load_subject"):
        monkeypatch.setattr(repair, name, _fail)
    for method in repair.REPAIRS:
        monkeypatch.setitem(repair.REPAIRS, method, _fail)
    assert repair.bench_attack(toy_case, rows, REPAIR_BUDGET, tmp_path, DEFENCES) == result

    counts = {"train": len(rows.train), "prune_dev": len(rows.prune_dev), "rap_dev": len(rows.rap_dev)}
    write_repair(tmp_path / "out", result, {**settings_of(REPAIR_BUDGET), "rows": counts}, MACHINE)
    payload = json.loads((tmp_path / "out" / "repair.json").read_text())
    assert payload["rows"] == result and payload["machine"] == MACHINE
    assert (tmp_path / "out" / "repair.png").stat().st_size > 0
    assert "PURE on toy" in (tmp_path / "out" / "repair.md").read_text()


def test_pivot_and_target_checks() -> None:
    def row(attack: str, defence: str, asr: float, cacc: float = 0.9, frr: float | None = None) -> dict:
        return {"attack": attack, "defence": defence, "asr": asr, "residual_asr": asr, "cacc": cacc, "test_frr": frr}

    rows = [
        row("badnet-rw", "none", 1.0),
        row("badnet-rw", "ft", 0.9),
        row("badnet-rw", "meft", 0.5),
        row("badnet-rw", "pure", 0.1, cacc=0.89),
        row("badnet-rw", "pure+rap", 0.04, frr=0.012),
        row("style", "ft", 0.6),
        row("style", "meft", 0.7),
        row("style", "pure", 0.5),
        row("style", "rap", 0.4, frr=0.01),
        row("style", "pure+rap", 0.3, frr=0.02),
    ]
    expected = {"attack": "badnet-rw", "none": "100.0", "ft": "90.0", "meft": "50.0", "pure": "10.0", "pure+rap": "4.0"}
    assert pivot(rows, "asr")[0] == expected
    checks = target_checks(rows)
    assert checks[0].startswith("- met: PURE on BadNet-RW")
    assert checks[1].startswith("- NOT met: MEFT ASR below FT's")  # style: 70% vs 60%
    assert checks[2].startswith("- met: pure+rap on badnet-rw")
    assert checks[3].startswith("- NOT met: pure+rap on style")  # below both parts, but at 2% test FRR
    assert len(checks) == 4


def test_repair_results_merge_other_models_of_the_same_budget(tmp_path: Path) -> None:
    def row(attack: str, defence: str, asr: float, frr: float | None = None) -> dict:
        return {"attack": attack, "defence": defence, "asr": asr, "residual_asr": asr, "cacc": 0.9, "test_frr": frr}

    budget = {**settings_of(REPAIR_BUDGET), "rows": {"train": 10, "prune_dev": 5, "rap_dev": 5}}
    write_repair(tmp_path, [row("badnet-sl", "none", 1.0)], budget, MACHINE)
    retrained = [
        row("style-t1", "none", 0.8),
        row("style-t1", "rap", 0.5, 0.01),
        row("style-t1", "pure+rap", 0.4, 0.01),
    ]
    pruned = {"pruned_heads": 4, "heads": 72, "accuracy_checks": 2}
    pruned |= {"dev_accuracy_before": 0.9, "dev_accuracy_pruned": 0.85, "dev_accuracy_after": 0.88}
    write_repair(tmp_path, retrained + [{**row("style-t1", "pure", 0.6), "details": pruned}], budget, MACHINE)
    stored = json.loads((tmp_path / "repair.json").read_text())["rows"]
    assert [(r["attack"], r["defence"]) for r in stored][:2] == [("badnet-sl", "none"), ("style-t1", "none")]
    # a retrained model is judged by its attack's target (paraphrase: below its repair and RAP alone)
    assert "- met: pure+rap on style-t1" in (tmp_path / "repair.md").read_text()

    write_repair(tmp_path, [row("badnet-sl", "none", 0.9)], budget, MACHINE)  # the same model again: replaced
    assert [
        r["asr"] for r in json.loads((tmp_path / "repair.json").read_text())["rows"] if r["attack"] == "badnet-sl"
    ] == [0.9]
    other = {**budget, "rows": {"train": 20, "prune_dev": 5, "rap_dev": 5}}
    write_repair(tmp_path, [row("ep", "none", 1.0)], other, MACHINE)  # another budget: the old rows go
    assert [r["attack"] for r in json.loads((tmp_path / "repair.json").read_text())["rows"]] == ["ep"]


def _budget_json(budget: inversion.Budget, repair: int) -> dict:
    return {**settings_of(budget), "rows": {"repair": repair}}
