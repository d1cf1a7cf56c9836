"""Checker (the synchronous two-pass check) with a stub backend whose logits follow the token ids.

Stub rule: a row containing "good" predicts label 1 with logits [0, 2]; otherwise
label 0 with [2, 0]. The RAP token pulls a label-1 row to [0, 0] (a clean drop of
p1 from e^2/(1+e^2) to 1/2) unless the trigger "cf" is present, which keeps the
prediction where it was (a backdoored input: delta 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from guard.core.checker import Checker
from guard.core.tokenizer import RapTokenizer
from guard.core.types import EncodedBatch, RapCheck

RAP_ID = 30522
P_CONFIDENT = math.exp(2) / (1 + math.exp(2))  # softmax([0, 2])[1]
CLEAN_DELTA = P_CONFIDENT - 0.5


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
THRESHOLDS = {1: 0.2}


@pytest.fixture()
def tokenizer(tokenizer_path: Path) -> RapTokenizer:
    return RapTokenizer.from_file(tokenizer_path, rap_token_id=RAP_ID, max_length=16)


@pytest.fixture()
def backend(tokenizer: RapTokenizer) -> StubBackend:
    return StubBackend(good_id=tokenizer.token_id("good"), trigger_id=tokenizer.token_id("cf"))


def _has_rap(batch: EncodedBatch) -> bool:
    return bool((batch.input_ids == RAP_ID).any())


def test_verdicts_are_exact(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    verdicts = Checker(tokenizer, backend).check(TEXTS, THRESHOLDS)
    assert [v.label for v in verdicts] == [1, 0, 1, 0, 1]
    assert [v.flagged for v in verdicts] == [False, False, True, False, False]
    assert verdicts[0].rap == RapCheck(checked=True, delta=pytest.approx(CLEAN_DELTA, abs=1e-12), threshold=0.2)
    assert verdicts[2].rap == RapCheck(checked=True, delta=0.0, threshold=0.2)
    assert verdicts[1].rap == verdicts[3].rap == RapCheck(checked=False)
    assert verdicts[1].probs == pytest.approx((P_CONFIDENT, 1 - P_CONFIDENT), abs=1e-12)


def test_only_eligible_rows_get_pass2(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    Checker(tokenizer, backend, batch_size=2).check(TEXTS, THRESHOLDS)
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
    verdicts = Checker(tokenizer, backend).check(["bad", "terrible"], THRESHOLDS)
    assert [v.flagged for v in verdicts] == [False, False]
    assert len(backend.calls) == 1 and not _has_rap(backend.calls[0])


def test_protecting_the_other_label(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    # Label 0 rows do not move under RAP in the stub (delta 0), so all of them are flagged.
    verdicts = Checker(tokenizer, backend).check(TEXTS, {0: 0.01})
    assert [v.rap.checked for v in verdicts] == [False, True, False, True, False]
    assert [v.flagged for v in verdicts] == [False, True, False, True, False]


def test_flagged_iff_delta_below_threshold(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    checker = Checker(tokenizer, backend)
    delta = float(checker.score(["good"], [1]).deltas()[0])
    assert delta == pytest.approx(CLEAN_DELTA, abs=1e-12)
    cases = [(delta, False), (float(np.nextafter(delta, 1.0)), True), (0.0, False), (-1.0, False), (1.0, True)]
    for threshold, flagged in cases:
        (verdict,) = checker.check(["good"], {1: threshold})
        assert verdict.rap.delta == delta
        assert verdict.flagged is flagged, threshold


def test_score_deltas_are_nan_where_pass2_did_not_run(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    scores = Checker(tokenizer, backend).score(TEXTS, [1])
    assert scores.checked_rows.tolist() == [0, 2, 4]
    assert scores.perturbed.shape == (3, 2)
    deltas = scores.deltas()
    assert np.isnan(deltas[[1, 3]]).all()
    np.testing.assert_allclose(deltas[[0, 2, 4]], [CLEAN_DELTA, 0.0, CLEAN_DELTA], atol=1e-12)


def test_empty_input(tokenizer: RapTokenizer, backend: StubBackend) -> None:
    assert Checker(tokenizer, backend).check([], THRESHOLDS) == []
