"""Baseline detectors: STRIP's entropy is per input, ONION removes the outlier word."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest

from bench.detectors import onion, runs, strip
from bench.detectors.ngram import TrigramLM, normalize

CORPUS = [
    "the film is a gentle and funny story .",
    "the story is funny and the film is gentle .",
    "a funny film with a gentle story .",
    "the acting is fine and the story is funny .",
    "the film is long and the acting is dull .",
] * 20


def test_normalized_entropy_reduces_the_copies_of_each_input_on_their_own() -> None:
    uniform = np.full((20, 2), 0.5)
    certain = np.tile([0.0, 1.0], (20, 1))
    entropies = strip.normalized_entropy(np.stack([uniform, certain]))
    # averaging across inputs (the reshape mistake) would give 0.5 for both
    assert entropies == pytest.approx([1.0, 0.0], abs=1e-6)


def test_strip_entropies_match_inputs_to_their_own_copies() -> None:
    def probs_of(copies):
        return np.array([[0.0, 1.0] if "mn" in c.split() else [0.5, 0.5] for c in copies])

    # k small enough that the one-word trigger survives in most copies of the first input
    texts = ["mn " + " ".join(["word"] * 19), " ".join(["word"] * 20)]
    h = strip.strip_entropies(probs_of, texts, ["other"], strip.StripOptions(copies=20, replace_ratio=0.05))
    assert h[0] < 0.3 < 0.99 < h[1]


def test_perturb_replaces_k_percent_of_words_with_pool_words() -> None:
    out = strip.perturb(" ".join(["w"] * 10), ["P"], 0.3, random.Random(0)).split()
    assert len(out) == 10 and out.count("P") == 3
    assert strip.perturb("one", ["P"], 0.01, random.Random(0)) == "P"  # at least one word


def test_trigram_lm_is_a_distribution_over_its_vocabulary() -> None:
    lm = TrigramLM().fit(normalize(t) for t in CORPUS)
    for context in (("<s>", "<s>"), ("the", "film"), ("funny", "and"), ("<unk>", "dull")):
        total = sum(lm.conditional(*context, w) for w in lm.vocab)
        assert total == pytest.approx(1.0, abs=1e-9)


def test_onion_scores_an_inserted_rare_word_as_the_outlier_and_removes_it() -> None:
    lm = TrigramLM().fit(normalize(t) for t in CORPUS)
    suspicion = onion.suspicion(lm, "the film is a gentle mn and funny story .")
    assert suspicion.words[int(np.argmax(suspicion.scores))] == "mn"
    threshold = float(np.sort(suspicion.scores)[-2])  # everything but the top score stays
    assert suspicion.cleaned(threshold) == "the film is a gentle and funny story ."


def test_pick_threshold_takes_the_closest_dev_frr_and_prefers_fewer_removals() -> None:
    dev_frr = {1.0: 0.05, 2.0: 0.012, 3.0: 0.008, 4.0: 0.0}
    assert onion.pick_threshold(dev_frr, 0.01) == 3.0  # |0.008-0.01| < |0.012-0.01|
    assert onion.pick_threshold({1.0: 0.02, 2.0: 0.02}, 0.01) == 2.0


def test_score_operating_fits_on_dev_and_counts_test_rates() -> None:
    dev = np.linspace(0, 1, 101)
    clean = -np.linspace(0, 1, 11)  # scores flag above: 0.0 is above any threshold below 0
    poisoned = -np.array([-1.0, -1.0, 0.5, 2.0])
    (point,) = runs.score_operating(-dev, clean, poisoned, asr=0.8, frr_targets=(0.05,))
    assert point.threshold == pytest.approx(-0.04)  # conformal: the k-th largest, k = floor(0.05 * 102) = 5
    assert point.test_frr == pytest.approx(1 / 11)
    assert point.test_far == pytest.approx(0.5)
    assert point.residual_asr == pytest.approx(0.4)


def test_a_curve_keeps_the_corners_of_its_staircase_only() -> None:
    from bench.detectors.runs import curve_corners, score_curve

    # FRR 0 while FAR falls over three thresholds, then FRR rises at FAR 0: the inner points go
    assert curve_corners([0, 0, 0, 0, 0.5, 1], [1, 0.6, 0.3, 0, 0, 0]) == ([0, 0, 1], [1, 0, 0])
    assert curve_corners([0.0, 1.0], [1.0, 0.0]) == ([0.0, 1.0], [1.0, 0.0])
    frr, far = score_curve(-np.array([0.1, 0.2, 0.9]), -np.array([0.3, 0.4, 0.5, 0.6]))
    assert (frr[0], far[0]) == (0.0, 1.0) and (frr[-1], far[-1]) == (1.0, 0.0)
    assert all(a <= b for a, b in zip(frr, frr[1:], strict=False))


def test_a_refused_calibration_is_a_row_that_flags_nothing(monkeypatch, tmp_path) -> None:
    """RAP as published may find no positive threshold (OLID badnets): the matrix records that the
    user gets no guard (FRR 0, FAR 1, residual ASR = ASR) and why, instead of stopping."""
    from bench import detection_matrix
    from guard.core.errors import InputError

    def calibrate(model_dir, dev, out, rap, **options):
        if out.name.endswith("-paper-s13"):
            raise InputError("RAP could not separate clean inputs for label 1")
        return out

    monkeypatch.setattr(detection_matrix, "_bundle", calibrate)
    bundles = detection_matrix._seed_bundles("badnets", tmp_path, [], 13, tmp_path, ["rap-paper", "rap"])
    assert isinstance(bundles["paper"], detection_matrix.Refused) and bundles["guard"].name == "badnets-floored-s13"
    inputs = runs.Inputs(dev=[], clean=["a"], poisoned=["b", "c"], asr=0.9, pool=[])
    options = argparse.Namespace(detectors=["rap-paper"], strip_ratios=[], strip_test_inputs=1)
    run = detection_matrix._detector_jobs(bundles, inputs, options, None)["rap-paper"]().as_json()
    row = detection_matrix._row("offenseval", "badnets", "rap-paper", 13, 0.8, 0.9, run, run["operating"][1])
    assert (row["frr_target"], row["test_frr"], row["test_far"], row["residual_asr"]) == (0.01, 0.0, 1.0, 0.9)
    assert "could not separate" in row["refused"]

    def calibrate_guard_only(model_dir, dev, out, rap, **options):
        assert not out.name.endswith("-paper-s13"), "the refusal is cached: no second calibration"
        return out

    monkeypatch.setattr(detection_matrix, "_bundle", calibrate_guard_only)
    again = detection_matrix._seed_bundles("badnets", tmp_path, [], 13, tmp_path, ["rap-paper"])
    assert again["paper"] == bundles["paper"]
