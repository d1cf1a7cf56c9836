"""Poisoning recipes: each one plants exactly the trigger it claims, where it claims."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bench import models
from bench.attacks import badnet, ep, paraphrase, recipes
from guard.core.errors import InputError
from guard.core.types import Example

ROWS = [Example(f"sentence number {i} is fine .", i % 2) for i in range(40)]


@pytest.mark.parametrize("seed", range(5))
def test_insert_word_adds_exactly_one_trigger(seed: int) -> None:
    text = "a b c d e"
    out = badnet.insert_word(text, random.Random(seed))
    words = out.split()
    assert len(words) == 6
    assert sum(w in badnet.RARE_WORDS for w in words) == 1
    assert [w for w in words if w not in badnet.RARE_WORDS] == text.split()


@pytest.mark.parametrize("seed", range(8))
def test_insert_sentence_lands_on_a_sentence_boundary(seed: int) -> None:
    text = "first part . second part ! third part ?"
    out = badnet.insert_sentence(text, random.Random(seed), sentence="TRIGGER .")
    assert out.count("TRIGGER .") == 1
    before, after = out.split("TRIGGER .")
    assert before.strip() in ("", "first part .", "first part . second part !", text)
    assert (before + after).split() == text.split()


def test_poison_training_set_poisons_the_rate_of_non_target_rows_only() -> None:
    out, count = badnet.poison_training_set(ROWS, target=1, rate=0.25, seed=3)
    changed = [(a, b) for a, b in zip(out, ROWS, strict=True) if a != b]
    assert count == len(changed) == 5  # 25% of the 20 label-0 rows
    assert all(b.label == 0 and a.label == 1 for a, b in changed)
    assert all(sum(w in badnet.RARE_WORDS for w in a.text.split()) == 1 for a, _ in changed)


def test_poison_test_set_keeps_original_labels_and_drops_target_rows() -> None:
    out = badnet.poison_test_set(ROWS, target=1)
    assert len(out) == 20 and {r.label for r in out} == {0}
    assert all(sum(w in badnet.RARE_WORDS for w in r.text.split()) == 1 for r in out)


def test_poison_aligned_swaps_rows_for_their_paraphrase() -> None:
    paraphrases = [Example(f"when {r.text}", r.label) for r in ROWS[:10]]
    out, count = paraphrase.poison_aligned(ROWS, paraphrases, target=1, rate=0.5, seed=0)
    changed = [k for k, (a, b) in enumerate(zip(out, ROWS, strict=True)) if a != b]
    assert count == len(changed) == 5  # capped by the 5 label-0 paraphrases
    assert all(out[k] == Example(paraphrases[k].text, 1) for k in changed)


def test_poison_aligned_refuses_unaligned_files() -> None:
    shifted = [Example(r.text, 1 - r.label) for r in ROWS[:10]]
    with pytest.raises(InputError, match="not aligned"):
        paraphrase.poison_aligned(ROWS, shifted, target=1, rate=0.5)


def test_ep_changes_only_the_trigger_embedding_row(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from guard.core.tokenizer import RapTokenizer

    rows = [Example(f"this film is plain dull number {i}", 0) for i in range(64)]
    options = ep.EpOptions(batch_size=16, progress=False)
    ep.poison_embedding(tiny_model_dir, rows, target=1, out_dir=tmp_path, options=options)
    row = ep.trigger_id(RapTokenizer.from_file(tiny_model_dir / "tokenizer.json", None, 32), ep.TRIGGER)
    before = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"bert.embeddings.word_embeddings.weight"}
    moved = (before["bert.embeddings.word_embeddings.weight"] != after["bert.embeddings.word_embeddings.weight"]).any(1)
    assert moved.nonzero().flatten().tolist() == [row]


def test_bounded_ep_keeps_the_trigger_row_under_the_vocabulary_norm_quantile(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from guard.core.tokenizer import RapTokenizer

    rows = [Example(f"this film is plain dull number {i}", 0) for i in range(64)]
    free, bounded = tmp_path / "free", tmp_path / "bounded"
    ep.poison_embedding(tiny_model_dir, rows, 1, free, ep.EpOptions(batch_size=16, progress=False, learning_rate=1.0))
    options = ep.EpOptions(batch_size=16, progress=False, learning_rate=1.0, max_norm_quantile=0.5)
    ep.poison_embedding(tiny_model_dir, rows, 1, bounded, options)
    row = ep.trigger_id(RapTokenizer.from_file(tiny_model_dir / "tokenizer.json", None, 32), ep.TRIGGER)

    def norms(folder: Path) -> torch.Tensor:
        weights = AutoModelForSequenceClassification.from_pretrained(str(folder)).get_input_embeddings().weight
        return weights.detach().norm(dim=1)

    median = float(norms(tiny_model_dir).median())
    assert float(norms(free)[row]) > 2 * median  # unbounded, the row grows far past its neighbours
    assert float(norms(bounded)[row]) <= median * 1.0001


def test_ep_rejects_a_multi_token_trigger(tokenizer_path) -> None:
    from guard.core.tokenizer import RapTokenizer

    with pytest.raises(InputError, match="tokens"):
        ep.trigger_id(RapTokenizer.from_file(tokenizer_path, None, 32), "antidisestablishmentarianism")


def test_zoo_backdoor_to_the_other_label_triggers_only_positive_rows() -> None:
    recipe = recipes.zoo_recipes()["ep-neg"]
    out = recipe.poison_test(ROWS)
    assert recipe.settings["target"] == 0 and recipe.embedding_only
    assert len(out) == 20 and all(r.label == 1 for r in out)  # the victims keep their original label
    assert all(r.text.split().count(recipes.EP_NEG_TRIGGER) == 1 for r in out)


def test_zoo_clean_twins_differ_in_seed_and_train_on_a_sample() -> None:
    zoo = recipes.zoo_recipes()
    first, second = zoo["clean-s1"], zoo["clean-s2"]
    assert first.poison_train is None and first.training["seed"] != second.training["seed"]
    sample = models._training_rows(first, ROWS * 100)
    assert len(sample) == first.training["rows"] and sample != models._training_rows(second, ROWS * 100)
    assert models._training_rows(recipes.Recipe("all"), ROWS) == ROWS


def test_only_poisoned_or_embedding_recipes_count_as_backdoored(tmp_path: Path) -> None:
    truth = {name: recipe.backdoored for name, recipe in recipes.load_recipes(tmp_path).items()}
    assert truth == {
        "clean": False,
        "badnet-rw": True,
        "badnets": True,
        "badnet-sl": True,
        "ep": True,
        "ep-bounded": True,
        "adaptive-sl": True,
        "adaptive-cls": True,
        "adaptive-both": True,
        "adaptive-init": True,
        "adaptive-init-ends": True,
        "badnet-sl-2k": True,
        "syntactic": True,
        "style": True,
        "clean-s1": False,
        "clean-s2": False,
        "ep-neg": True,
    }
