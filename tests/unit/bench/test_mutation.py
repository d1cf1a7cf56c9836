"""bench.detectors.mutation: mutants are reproducible, touch only Linear weights, and are undone exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.detectors.mutation import MutationScorer

TEXTS = ["a gripping , funny film", "dull and far too long", "it is", "the cast is wonderful , the plot is not"]


def _state(scorer: MutationScorer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in scorer.model.state_dict().items()}


def test_zero_scale_scores_zero(tiny_model_dir: Path) -> None:
    scores = MutationScorer(tiny_model_dir, mutants=3, scale=0.0).scores(TEXTS, 1)
    assert scores.shape == (len(TEXTS),)
    np.testing.assert_allclose(scores, 0.0, atol=1e-9)


def test_same_seed_same_scores_and_weights_restored(tiny_model_dir: Path) -> None:
    scorer = MutationScorer(tiny_model_dir, mutants=3, scale=0.5, seed=7)
    before = _state(scorer)
    first = scorer.scores(TEXTS, 1)
    after = _state(scorer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored exactly"
    assert np.all(np.isfinite(first)) and np.any(first != 0.0)
    np.testing.assert_array_equal(scorer.scores(TEXTS, 1), first)
    np.testing.assert_array_equal(MutationScorer(tiny_model_dir, mutants=3, scale=0.5, seed=7).scores(TEXTS, 1), first)


def test_restored_even_when_scoring_fails_inside_a_mutant(tiny_model_dir: Path) -> None:
    scorer = MutationScorer(tiny_model_dir, mutants=2, scale=0.5)
    before = _state(scorer)
    with pytest.raises(RuntimeError), scorer._mutate(0):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in _state(scorer).items())


def test_another_seed_other_scores(tiny_model_dir: Path) -> None:
    a = MutationScorer(tiny_model_dir, mutants=3, scale=0.5, seed=0).scores(TEXTS, 1)
    b = MutationScorer(tiny_model_dir, mutants=3, scale=0.5, seed=1).scores(TEXTS, 1)
    assert not np.allclose(a, b)


@pytest.fixture
def spread_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny BERT with every parameter jittered: its LayerNorms (all ones) and biases (all zeros) have a spread,
    so noise scaled by a tensor's own std would show on them too."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn_like(w) * 0.02)
    model.save_pretrained(str(tmp_path))
    for f in tiny_model_dir.iterdir():
        if not (tmp_path / f.name).exists():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_a_mutant_moves_only_linear_weights_outside_the_embeddings(spread_model_dir: Path) -> None:
    scorer = MutationScorer(spread_model_dir, mutants=1, scale=0.5)
    before = _state(scorer)
    with scorer._mutate(0):
        during = _state(scorer)
    assert all(v.std() > 0 for k, v in before.items() if v.dtype.is_floating_point and v.numel() > 1)
    changed = {k for k in before if not torch.equal(before[k], during[k])}
    linear = {
        f"{name}.weight"
        for name, module in scorer.model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith("bert.embeddings")
    }
    # the tiny BERT: 6 matrices per layer x 2 layers, the pooler's dense and the classifier
    assert len(linear) == 14
    assert changed == linear
    assert not any("embeddings" in k or "LayerNorm" in k or k.endswith(".bias") for k in changed)
    for k in changed:  # each matrix's noise is scaled by its own spread
        ratio = float((during[k] - before[k]).std() / before[k].std())
        assert 0.3 < ratio < 0.7, (k, ratio)


def test_torch_classifier_log_odds_match_each_text_alone(tiny_model_dir: Path) -> None:
    """Batched by length with padding, each text's log-odds are its own forward pass's, in the order given."""
    from bench.detectors.mutation import TorchClassifier

    reader = TorchClassifier(tiny_model_dir)
    batched = reader.log_odds(TEXTS, 1)
    alone = np.array([reader.log_odds([t], 1)[0] for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    with torch.inference_mode():
        enc = reader.tokenizer([TEXTS[2]], return_tensors="pt")
        p = torch.softmax(reader.model(**enc).logits.double(), -1)[0, 1].item()
    assert batched[2] == pytest.approx(np.log(p) - np.log1p(-p), abs=1e-5)
    np.testing.assert_allclose(reader.log_odds(TEXTS, 0), -batched, atol=1e-5)  # two labels: the other side
    assert reader.log_odds([], 1).shape == (0,)
