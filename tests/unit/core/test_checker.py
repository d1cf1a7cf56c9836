"""Checker (the synchronous two-pass check) with a stub backend whose logits follow the token ids.

Stub rule: a row containing "good" predicts label 1 with logits [0, 2]; otherwise
label 0 with [2, 0]. The RAP token pulls a label-1 row to [0, 0] (a clean drop of
p1 from e^2/(1+e^2) to 1/2) unless the trigger "cf" is present, which keeps the
prediction where it was (a backdoored input: RAP score 0 under the `prob` statistic).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from guard.core.checker import Checker
from guard.core.errors import InputError
from guard.core.runner import GuardFailure, TwoPass
from guard.core.tokenizer import RapTokenizer
from guard.core.types import EncodedBatch, LabelThresholds, RapCheck

RAP_ID = 30522
P_CONFIDENT = math.exp(2) / (1 + math.exp(2))  # softmax([0, 2])[1]
CLEAN_SCORE = 0.5 - P_CONFIDENT  # p1(x+RAP) - p1(x)


class StubBackend:
    name = "stub"

    def __init__(self, good_id: int, trigger_id: int) -> None:
        self.good_id = good_id
        self.trigger_id = trigger_id
        self.calls: list[EncodedBatch] = []

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        self.calls.append(batch)
        return np.array(
            [
                self._logits(set(row[mask == 1].tolist()))
                for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True)
            ],
            dtype=np.float32,
        )

    def _logits(self, ids: set[int]) -> list[float]:
        if self.good_id not in ids:
            return [2.0, 0.0]
        if RAP_ID in ids and self.trigger_id not in ids:
            return [0.0, 0.0]
        return [0.0, 2.0]

    def close(self) -> None:
        pass


TEXTS = ["a good film", "a bad film", "good cf movie", "terrible", "good"]
THRESHOLDS = {1: LabelThresholds(-0.2)}


@pytest.fixture()
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=16)


@pytest.fixture()
def backend(tokenizer: RapTokenizer) -> StubBackend:
    return StubBackend(good_id=tokenizer.token_id("good"), trigger_id=tokenizer.token_id("cf"))


def _has_rap(batch: EncodedBatch) -> bool:
    return bool((batch.input_ids == RAP_ID).any())


def _checker(tokenizer, backend, limits=THRESHOLDS, **kwargs) -> Checker:
    return Checker(TwoPass(tokenizer, limits, "prob"), backend, **kwargs)


def test_verdicts_are_exact(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    verdicts = _checker(tokenizer, backend).check(TEXTS)
    assert [v.label for v in verdicts] == [1, 0, 1, 0, 1]
    assert [v.flagged for v in verdicts] == [False, False, True, False, False]
    assert verdicts[0].rap == RapCheck(checked=True, score=pytest.approx(CLEAN_SCORE, abs=1e-12), threshold=-0.2)
    assert verdicts[2].rap == RapCheck(checked=True, score=0.0, threshold=-0.2)
    assert verdicts[2].flagged_by == ("rap",)
    assert verdicts[1].rap == verdicts[3].rap == RapCheck(checked=False)
    assert verdicts[1].probs == pytest.approx((P_CONFIDENT, 1 - P_CONFIDENT), abs=1e-12)


def test_only_eligible_rows_get_pass2(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    _checker(tokenizer, backend, batch_size=2).check(TEXTS)
    pass1 = [b for b in backend.calls if not _has_rap(b)]
    pass2 = [b for b in backend.calls if _has_rap(b)]
    assert [len(b) for b in pass1] == [2, 2, 1]  # all 5 rows, in batches of 2
    assert [len(b) for b in pass2] == [2, 1]  # rows 0, 2, 4 only
    assert [_has_rap(b) for b in backend.calls] == [False] * 3 + [True] * 2  # pass 1 first, then pass 2
    expected = [tokenizer.encode_perturbed([TEXTS[0], TEXTS[2]]), tokenizer.encode_perturbed([TEXTS[4]])]
    for got, want in zip(pass2, expected, strict=True):
        assert np.array_equal(got.input_ids, want.input_ids)
        assert np.array_equal(got.attention_mask, want.attention_mask)
        assert (got.input_ids[:, 1] == RAP_ID).all()


def test_no_pass2_when_nothing_is_protected_label(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    verdicts = _checker(tokenizer, backend).check(["bad", "terrible"])
    assert [v.flagged for v in verdicts] == [False, False]
    assert len(backend.calls) == 1 and not _has_rap(backend.calls[0])


def test_protecting_the_other_label(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    # Label 0 rows do not move under RAP in the stub (score 0), so all of them are flagged.
    verdicts = _checker(tokenizer, backend, {0: LabelThresholds(-0.01)}).check(TEXTS)
    assert [v.rap.checked for v in verdicts] == [False, True, False, True, False]
    assert [v.flagged for v in verdicts] == [False, True, False, True, False]


def test_flagged_iff_score_above_threshold(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    score = float(_checker(tokenizer, backend).scores(["good"]).rap[0])
    assert score == pytest.approx(CLEAN_SCORE, abs=1e-12)
    cases = [(score, False), (float(np.nextafter(score, -1.0)), True), (0.0, False), (1.0, False), (-1.0, True)]
    for threshold, flagged in cases:
        (verdict,) = _checker(tokenizer, backend, {1: LabelThresholds(threshold)}).check(["good"])
        assert verdict.rap.score == score
        assert verdict.flagged is flagged, threshold


def test_scores_are_nan_where_pass2_did_not_run(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    scores = _checker(tokenizer, backend).scores(TEXTS)
    assert np.isnan(scores.rap[[1, 3]]).all()
    np.testing.assert_allclose(scores.rap[[0, 2, 4]], [CLEAN_SCORE, 0.0, CLEAN_SCORE], atol=1e-12)


def test_empty_input(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    assert _checker(tokenizer, backend).check([]) == []


def test_a_text_with_no_token_is_refused_and_non_finite_output_fails(tokenizer, backend) -> None:
    """The offline check refuses what the server refuses (the parity test runs all three entry points)."""
    with pytest.raises(InputError, match="empty"):
        _checker(tokenizer, backend).check(["good", "\u200b"])
    backend._logits = lambda ids: [float("nan"), 0.0]
    with pytest.raises(GuardFailure, match="non-finite") as failed:
        _checker(tokenizer, backend).check(["good"])
    assert failed.value.reason == "nonfinite"


class StubReader(StubBackend):
    """A clean reader: positive on "good", whatever else the text holds, and only just ([0, 0.5])."""

    def _logits(self, ids: set[int]) -> list[float]:
        return [0.0, 0.5] if self.good_id in ids and self.trigger_id not in ids else [1.0, 0.0]


@pytest.mark.parametrize("schedule", ["lazy", "fused"])
def test_the_reader_reads_only_protect_label_rows_unchanged_and_flags_what_it_disputes(
    tokenizer: RapTokenizer, backend: StubBackend, schedule: str
) -> None:
    reader = StubReader(backend.good_id, backend.trigger_id)
    limits = {1: LabelThresholds(reader=2.0)}  # suspect log-odds 2 minus the reader's: 1.5 clean, 3 disputed
    checker = Checker(TwoPass(tokenizer, limits, "prob", schedule=schedule), backend, reader=reader)
    scores = checker.scores(TEXTS)
    assert np.allclose(scores.reader, [1.5, np.nan, 3.0, np.nan, 1.5], equal_nan=True)
    assert np.isnan(scores.rap).all()  # RAP off: no pass 2
    read = [r[m == 1].tolist() for b in reader.calls for r, m in zip(b.input_ids, b.attention_mask, strict=True)]
    assert read == [tokenizer.encode([t]).input_ids[0].tolist() for t in ("a good film", "good cf movie", "good")]
    assert not any(_has_rap(b) for b in reader.calls)
    verdicts = checker.check(TEXTS)
    assert [v.flagged_by for v in verdicts] == [(), (), ("reader",), (), ()]


def test_the_reader_pass_goes_with_pass_2_and_its_failures_are_guard_failures(tokenizer, backend) -> None:
    reader = StubReader(backend.good_id, backend.trigger_id)
    limits = {1: LabelThresholds(-0.2, reader=2.0)}
    two_pass = TwoPass(tokenizer, limits, "prob")
    assert two_pass.passes == 3
    steps = two_pass.run(tokenizer.windows(["good", "bad"])).steps()
    assert [p.name for p in next(steps)] == ["1"]
    later = steps.send([backend.infer(tokenizer.pad(tokenizer.windows(["good", "bad"]).rows))])
    assert [(p.name, len(p.rows), p.priority) for p in later] == [("2", 1, True), ("R", 1, True)]
    with pytest.raises(ValueError, match="no reader graph"):
        Checker(two_pass, backend)
    reader._logits = lambda ids: [float("inf"), 0.0]
    with pytest.raises(GuardFailure, match="non-finite logits in the reader pass"):
        Checker(two_pass, backend, reader=reader).check(["good"])


class SwitchingBackend(StubBackend):
    """A backdoor taught to switch off: with the trigger "cf" a row is label 1 and sure of it ([0, 4]), unless
    the word "rq" sits right after [CLS], which turns the backdoor off; a clean "good" row barely moves."""

    def __init__(self, good_id: int, trigger_id: int, word_id: int) -> None:
        super().__init__(good_id, trigger_id)
        self.word_id = word_id
        self.rows: list[list[int]] = []

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        self.rows += [r[m == 1].tolist() for r, m in zip(batch.input_ids, batch.attention_mask, strict=True)]
        return super().infer(batch)

    def _logits(self, ids: set[int]) -> list[float]:
        if self.trigger_id in ids:
            return [4.0, 0.0] if self.word_id in ids else [0.0, 4.0]
        if self.good_id in ids:
            return [0.0, 1.5] if self.word_id in ids else [0.0, 2.0]
        return [2.0, 0.0]


@pytest.mark.parametrize("schedule", ["lazy", "fused"])
def test_the_switch_pass_inserts_its_word_after_cls_on_protect_label_rows_and_flags_a_collapse(
    tokenizer: RapTokenizer, schedule: str
) -> None:
    word = tokenizer.token_id("rq")
    backend = SwitchingBackend(tokenizer.token_id("good"), tokenizer.token_id("cf"), word)
    two_pass = TwoPass(tokenizer, {1: LabelThresholds(switch=1.0)}, "prob", schedule=schedule, switch_id=word)
    assert two_pass.passes == 2 and not two_pass.uses_rap
    scores = Checker(two_pass, backend).scores(TEXTS)
    # the fall of label 1's log-odds: 2 - 1.5 on clean rows, 4 + 4 on the triggered one; label 0 rows unchecked
    assert np.allclose(scores.switch, [0.5, np.nan, 8.0, np.nan, 0.5], equal_nan=True)
    inserted = [r for r in backend.rows if word in r]
    plain = {t: tokenizer.encode([t]).input_ids[0].tolist() for t in ("a good film", "good cf movie", "good")}
    assert inserted == [[p[0], word, *p[1:]] for p in plain.values()]  # right after [CLS], every token kept
    assert [v.flagged_by for v in Checker(two_pass, backend).check(TEXTS)] == [(), (), ("switch",), (), ()]
    with pytest.raises(ValueError, match="no switch token id"):
        TwoPass(tokenizer, {1: LabelThresholds(switch=1.0)}, "prob")


def test_the_switch_pass_goes_with_pass_2_and_the_reader_and_its_failures_are_guard_failures(tokenizer) -> None:
    word = tokenizer.token_id("rq")
    backend = SwitchingBackend(tokenizer.token_id("good"), tokenizer.token_id("cf"), word)
    two_pass = TwoPass(tokenizer, {1: LabelThresholds(-0.2, reader=2.0, switch=1.0)}, "prob", switch_id=word)
    assert two_pass.passes == 4
    steps = two_pass.run(tokenizer.windows(["good", "bad"])).steps()
    assert [p.name for p in next(steps)] == ["1"]
    later = steps.send([backend.infer(tokenizer.pad(tokenizer.windows(["good", "bad"]).rows))])
    assert [(p.name, len(p.rows), p.priority) for p in later] == [("2", 1, True), ("R", 1, True), ("S", 1, True)]
    only = TwoPass(tokenizer, {1: LabelThresholds(switch=1.0)}, "prob", switch_id=word)
    backend._logits = lambda ids: [float("nan"), 0.0] if word in ids else [0.0, 2.0]
    with pytest.raises(GuardFailure, match="non-finite logits in the switch pass"):
        Checker(only, backend).check(["good"])


@pytest.mark.parametrize("at", ["front", "last token of the first window", "far end"])
def test_the_switch_pass_reads_every_window_of_a_long_text_within_the_row_length(tokenizer, at) -> None:
    """A trigger past the guard's own window (an upstream reading every token), or at a window's edge, is in some
    window's switch row: each row is that window plus the word, never longer than the graph's max_length."""
    from guard.core.tokenizer import ALL_TOKENS

    word = tokenizer.token_id("rq")
    backend = SwitchingBackend(tokenizer.token_id("good"), tokenizer.token_id("cf"), word)
    words = ["good"] * 40
    words.insert({"front": 0, "last token of the first window": tokenizer.text_window - 1, "far end": 40}[at], "cf")
    two_pass = TwoPass(tokenizer, {1: LabelThresholds(switch=1.0)}, "prob", switch_id=word)
    (verdict,) = Checker(two_pass, backend, classifier_max_length=ALL_TOKENS).check([" ".join(words)])
    assert verdict.flagged_by == ("switch",)
    switched = [r for r in backend.rows if word in r]
    assert len(switched) > 1 and max(map(len, switched)) <= tokenizer.max_length
