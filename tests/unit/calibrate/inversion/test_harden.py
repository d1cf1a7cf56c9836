"""`calibrate harden` (calibrate.inversion.harden): the scheduler as pure functions, then a short run on the toy.

The binary length search is checked on synthetic ASR-versus-length curves where
every "inversion" is a table lookup, so the number of inversions it needs is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from calibrate.inversion.harden import harden_model
from calibrate.inversion.options import HardenOptions, InversionOptions
from calibrate.inversion.schedule import (
    RunningMean,
    binary_length_search,
    eps_mean_average_asr,
    exhaustive_search,
    synchronise,
)
from calibrate.inversion.subject import load_subject
from guard.core.errors import InputError
from tests.toy_backdoor import Toy


@dataclass(frozen=True)
class Fake:
    """A stand-in for an Inversion: its length and ASR."""

    length: int
    asr: float


class Curve:
    """ASR as a function of trigger length; records every length 'inverted'."""

    def __init__(self, asr) -> None:
        self.asr = asr
        self.calls: list[int] = []

    def __call__(self, length: int) -> Fake:
        self.calls.append(length)
        return Fake(length, self.asr(length))


def step_at(first: int):
    """Monotone: below `first` the ASR climbs towards 0.8, from `first` on it is above."""
    return lambda m: 0.9 + 0.001 * m if m >= first else 0.7 * m / first


# ------------------------------------------------------------------ binary length search (Algorithm 2)


@pytest.mark.parametrize("first", [1, 2, 13, 31, 32, 63, 64])
def test_bls_finds_the_smallest_length_reaching_the_bound(first: int) -> None:
    curve = Curve(step_at(first))
    found = binary_length_search(curve, lower=1, upper=64, bound=0.8)
    assert found.length == first and found.reached
    assert found.trigger == Fake(first, curve.asr(first))
    assert len(curve.calls) <= math.ceil(math.log2(64)) + 2  # ~log2(epsilon): the lower bound, bisection, epsilon
    assert len(set(curve.calls)) == len(curve.calls)  # never the same length twice
    assert found.probes == tuple(curve.calls)


def test_bls_searches_below_a_running_average_that_is_too_high() -> None:
    """Algorithm 2 lines 3-8: the lower bound already succeeds for this batch, so halve it."""
    curve = Curve(step_at(5))
    found = binary_length_search(curve, lower=40, upper=64, bound=0.8)
    assert found.length == 5
    assert curve.calls[:4] == [40, 20, 10, 5]  # halving until a length fails (2), then bisecting
    assert len(curve.calls) <= 8


def test_bls_from_the_running_average_skips_the_lengths_below_it() -> None:
    curve = Curve(step_at(50))
    found = binary_length_search(curve, lower=40, upper=64, bound=0.8)
    assert found.length == 50
    assert min(curve.calls) == 40
    assert len(curve.calls) <= math.ceil(math.log2(64 - 40)) + 1


def test_bls_returns_the_upper_bound_when_nothing_reaches_it() -> None:
    curve = Curve(lambda m: m / 100)
    found = binary_length_search(curve, lower=1, upper=16, bound=0.8)
    assert (found.length, found.reached) == (16, False)
    assert found.trigger == Fake(16, 0.16)


def test_bls_with_equal_bounds_inverts_that_length() -> None:
    curve = Curve(lambda m: 0.1)
    found = binary_length_search(curve, lower=7, upper=7, bound=0.8)
    assert (found.length, curve.calls) == (7, [7])


def test_exhaustive_search_tries_every_shorter_length_and_keeps_the_best() -> None:
    """The randomised fallback (Sec. 4.2, appendix D): a bump below lambda that BLS would skip."""
    curve = Curve(lambda m: 0.95 if m == 3 else 0.1)
    found = exhaustive_search(curve, below=6, bound=0.8)
    assert curve.calls == [1, 2, 3, 4, 5]
    assert (found.length, found.reached, found.exhaustive) == (3, True, True)


# ------------------------------------------------------------------ synchronisation and lower bounds (Algorithm 1)


@pytest.mark.parametrize(
    ("forward", "backward", "regenerate", "updates"),
    [
        (10, 4, "forward", (False, True)),  # i->j has more progress: re-invert it at 4, update j->i only
        (4, 10, "backward", (True, False)),
        (6, 4, "forward", (False, True)),  # a gap of exactly delta counts
        (5, 4, None, (True, True)),  # in step: update both
        (4, 4, None, (True, True)),
    ],
)
def test_synchronise(forward: int, backward: int, regenerate: str | None, updates: tuple[bool, bool]) -> None:
    sync = synchronise(forward, backward, gap=2)
    assert sync.regenerate == regenerate
    assert (sync.update_forward, sync.update_backward) == updates


def test_running_mean_lower_bound() -> None:
    bound = RunningMean()
    assert bound.bound(upper=8) == 1  # Algorithm 1 line 1: every direction starts at 1
    bound.add(6)
    assert bound.value == 6.0  # the first observation replaces the initial 1
    bound.add(3)
    assert bound.value == 4.5
    assert bound.bound(upper=8) == 4  # rounded half to even
    bound.add(20)
    assert bound.bound(upper=8) == 8  # never above epsilon


# ------------------------------------------------------------------ eps-mA^2 (Definition I)


def test_eps_mean_average_asr_of_a_hand_made_matrix() -> None:
    asr = np.full((3, 3, 2), np.nan)
    asr[0, 1], asr[0, 2] = [0.2, 0.4], [0.6, 0.8]
    asr[1, 0], asr[1, 2] = [0.0, 1.0], [0.5, 0.5]
    asr[2, 0], asr[2, 1] = [0.1, 0.3], [0.9, 0.7]
    asr[1, 1] = [1.0, 1.0]  # the diagonal is no attack and must not count
    expected = (0.2 + 0.4 + 0.6 + 0.8 + 0.0 + 1.0 + 0.5 + 0.5 + 0.1 + 0.3 + 0.9 + 0.7) / (3 * 2 * 2)
    assert eps_mean_average_asr(asr) == pytest.approx(expected)


def test_eps_mean_average_asr_skips_pairs_that_could_not_be_measured() -> None:
    asr = np.full((2, 2, 3), np.nan)
    asr[0, 1] = [0.3, 0.6, 0.9]
    assert eps_mean_average_asr(asr) == pytest.approx(0.6)
    with pytest.raises(InputError, match="no label pair could be measured"):
        eps_mean_average_asr(np.full((2, 2, 3), np.nan))


# ------------------------------------------------------------------ a short run on the toy


@pytest.mark.slow
def test_hardening_the_toy_model(backdoored: Toy) -> None:
    subject = load_subject(backdoored.model_dir, max_length=32)
    options = HardenOptions(
        max_trigger_length=3,
        epochs=1,
        batch_size=16,
        learning_rate=1e-3,  # the toy was trained from random weights at this rate
        measure_rows_per_label=10,
        inversion=InversionOptions(steps=10),
        progress=False,
    )
    result = harden_model(subject, backdoored.dev[:120], options)
    assert len(result.rounds) >= 2 and {r.labels for r in result.rounds} == {(0, 1)}
    assert np.asarray(result.asr_before).shape == (2, 2, 3)
    assert 0 <= result.eps_ma2_after < result.eps_ma2_before <= 1
    assert result.cacc_after >= result.cacc_before - 0.05
    assert set(result.lower_bounds) == {"0->1", "1->0"}
    assert all(1 <= r.forward_length <= 3 and 1 <= r.backward_length <= 3 for r in result.rounds)
    for r in result.rounds:  # the synchronisation rule held in every round
        if r.regenerated == "forward":
            assert r.forward_length == r.backward_length
    assert result.to_json()["options"]["max_trigger_length"] == 3


def test_hardening_refuses_too_little_data(tiny_model_dir) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    with pytest.raises(InputError, match="too little clean data to harden"):
        harden_model(subject, [], HardenOptions(progress=False))


@pytest.mark.slow
def test_hardening_refuses_an_unmeasurable_split_before_training(backdoored: Toy) -> None:
    subject = load_subject(backdoored.model_dir, max_length=32)
    before = {k: v.clone() for k, v in subject.model.state_dict().items()}
    options = HardenOptions(holdout_fraction=0.01, inversion=InversionOptions(steps=2), progress=False)
    with pytest.raises(InputError, match="no label pair could be measured: every label needs 2"):
        harden_model(subject, backdoored.dev[:40], options)  # no held-out row is left to measure on
    assert all(torch.equal(v, before[k]) for k, v in subject.model.state_dict().items())
