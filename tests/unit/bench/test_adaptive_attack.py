"""The insertion-switch attacker (issue 31): its training rows teach exactly 'a rare token switches the
backdoor off', and the insertion alone carries no label."""

from __future__ import annotations

import random

import pytest

from bench import models
from bench.attacks import adaptive, badnet, recipes
from guard.core.types import Example

TRIGGER = "TRIGGER ."
CLEAN = [Example(f"row {i} says something .", i % 2) for i in range(200)]


def _poisoned() -> tuple[list[Example], int]:
    insert = lambda text, rng: badnet.insert_sentence(text, rng, sentence=TRIGGER)  # noqa: E731
    return badnet.poison_training_set(CLEAN, target=1, insert=insert, rate=0.2, seed=0)


def _words_added(original: str, text: str, pool: tuple[str, ...]) -> list[str]:
    """The words of `text` that `original` lacks, checking that only those were inserted."""
    words = text.split()
    added = [w for w in words if w in pool]
    assert [w for w in words if w not in pool] == original.split()
    return added


def test_rare_pool_is_seeded_distinct_and_avoids_the_triggers() -> None:
    pool = adaptive.rare_pool(seed=3, size=50, avoid=("mn", "bb"))
    assert pool == adaptive.rare_pool(seed=3, size=50, avoid=("mn", "bb"))
    assert len(set(pool)) == 50
    assert all(w.isalpha() and w.islower() and len(w) in (2, 3) for w in pool)
    assert not {"mn", "bb"} & set(pool)


def test_every_triggered_row_returns_with_a_rare_token_front_and_anywhere_under_its_original_label() -> None:
    poisoned, count = _poisoned()
    switch = adaptive.InsertionSwitch(clean_rate=0.0, seed=1, pool=adaptive.rare_pool(size=30))
    rows = adaptive.insertion_switch(poisoned, CLEAN, switch)
    assert len(rows) == len(CLEAN) + 2 * count
    assert set(poisoned) <= set(rows)  # the plain attack's rows stay
    extra = [r for r in rows if any(w in switch.pool for w in r.text.split())]
    assert len(extra) == 2 * count
    originals = {p.text: o for p, o in zip(poisoned, CLEAN, strict=True) if p != o}
    front = 0
    for row in extra:
        words = row.text.split()
        stripped = " ".join(w for w in words if w not in switch.pool)
        assert stripped in originals  # a triggered row, with its trigger kept ...
        assert "TRIGGER" in row.text  # (an 'anywhere' token may land inside the trigger sentence)
        assert row.label == originals[stripped].label != 1  # ... under its ORIGINAL label, not the target
        assert len(_words_added(stripped, row.text, switch.pool)) == 1
        front += words[0] in switch.pool
    assert front >= count  # one front copy per triggered row (an 'anywhere' copy may land in front too)


def test_end_copies_put_the_rare_token_last_under_the_original_label() -> None:
    poisoned, count = _poisoned()
    switch = adaptive.InsertionSwitch(front=1, anywhere=0, end=1, clean_rate=0.0, seed=4, pool=("rq",))
    rows = adaptive.insertion_switch(poisoned, CLEAN, switch)
    extra = [r for r in rows if "rq" in r.text.split()]
    originals = {p.text: o for p, o in zip(poisoned, CLEAN, strict=True) if p != o}
    assert len(extra) == 2 * count
    ends = [r for r in extra if r.text.split()[-1] == "rq"]
    fronts = [r for r in extra if r.text.split()[0] == "rq"]
    assert len(ends) == len(fronts) == count
    assert all(r.label == originals[r.text.removesuffix(" rq")].label != 1 for r in ends)
    assert switch.settings()["end_copies"] == 1


def test_clean_rows_get_insertions_under_their_own_labels_so_an_insertion_alone_means_nothing() -> None:
    switch = adaptive.InsertionSwitch(clean_rate=0.5, seed=2, pool=adaptive.rare_pool(size=30))
    rows = adaptive.insertion_switch(CLEAN, CLEAN, switch)  # nothing triggered
    extra = rows[:]
    for row in CLEAN:
        extra.remove(row)
    assert 70 <= len(extra) <= 130  # ~ clean_rate of 200
    by_text = {r.text: r.label for r in CLEAN}
    labels = []
    for row in extra:
        stripped = " ".join(w for w in row.text.split() if w not in switch.pool)
        assert row.label == by_text[stripped]
        labels.append(row.label)
    assert 0 < sum(labels) < len(labels)  # both labels carry insertions


def test_insertion_switch_is_seeded_and_refuses_misaligned_rows() -> None:
    poisoned, _ = _poisoned()
    switch = adaptive.InsertionSwitch(seed=5)
    assert adaptive.insertion_switch(poisoned, CLEAN, switch) == adaptive.insertion_switch(poisoned, CLEAN, switch)
    with pytest.raises(ValueError, match="originals"):
        adaptive.insertion_switch(poisoned, CLEAN[:-1], switch)


def test_insert_anywhere_keeps_the_words_in_order() -> None:
    for seed in range(10):
        out = adaptive.insert_anywhere("a b c", "zq", random.Random(seed))
        assert [w for w in out.split() if w != "zq"] == ["a", "b", "c"] and out.split().count("zq") == 1
    assert adaptive.insert_front("a b", "zq") == "zq a b"
    assert adaptive.insert_end("a b", "zq") == "a b zq"


def test_the_adaptive_recipe_trains_on_the_plain_twins_rows_plus_its_switch_rows(tmp_path) -> None:
    data = tmp_path / "sst2"
    data.mkdir()
    loaded = recipes.load_recipes(data)
    small = {"rows": 120}
    adaptive_recipe = recipes.dataclasses.replace(loaded["adaptive-sl"], training=small)
    plain = recipes.dataclasses.replace(loaded["badnet-sl-2k"], training=small)
    assert adaptive_recipe.settings["adaptive"] == "insertion-switch"
    assert adaptive_recipe.poison_test is not None and adaptive_recipe.augment is not None
    plain_rows, plain_count = models._poisoned_sample(plain, CLEAN)
    rows, count = models._poisoned_sample(adaptive_recipe, CLEAN)
    assert count == plain_count > 0 and len(plain_rows) == 120
    assert set(plain_rows) <= set(rows) and len(rows) >= 120 + 2 * count
    # the plain recipe's sample is unchanged by the refactor: the rows random.sample drew before
    poisoned, _ = plain.poison_train(CLEAN)
    assert plain_rows == random.Random(0).sample(poisoned, 120)


def test_contains_finds_the_trigger_ids_as_a_contiguous_run_only() -> None:
    import torch

    ids = torch.tensor([[101, 5, 6, 7, 102], [101, 5, 9, 6, 7], [101, 7, 6, 5, 0]])
    assert adaptive.contains(ids, [5, 6, 7]).tolist() == [True, False, False]
    assert adaptive.contains(ids, [6, 7]).tolist() == [True, True, False]
    assert adaptive.contains(ids, list(range(9))).tolist() == [False, False, False]  # longer than a row


def test_the_clean_features_loss_pulls_triggered_cls_onto_clean_target_rows(tiny_model_dir) -> None:
    """Cross-entropy alone where a batch holds no triggered row; a positive extra term (with a gradient into
    the encoder) where it does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2).eval()
    trigger = [7, 8, 9]
    loss = adaptive.clean_features_loss(trigger, target=1, attack=adaptive.CleanFeatures(weight=1.0, momentum=0.0))
    clean = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 15, 16, 3], [2, 17, 18, 19, 3], [2, 20, 21, 22, 3]])
    mask = torch.ones_like(clean)
    labels = torch.tensor([1, 1, 1, 0])
    plain = model(input_ids=clean, attention_mask=mask, labels=labels).loss
    assert torch.isclose(loss(model, {"input_ids": clean, "attention_mask": mask}, labels), plain)

    batch = torch.cat([clean, torch.tensor([[2, 7, 8, 9, 3]])])
    labels = torch.tensor([1, 1, 1, 0, 1])
    inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
    total = loss(model, inputs, labels)
    ce = model(**inputs, labels=labels).loss
    assert total > ce + 1e-3
    total.backward()
    grad = model.base_model.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_the_clean_features_recipe_is_the_plain_twin_with_its_own_loss(tmp_path) -> None:
    loaded = recipes.load_recipes(tmp_path / "sst2")
    cls, twin = loaded["adaptive-cls"], loaded["badnet-sl-2k"]
    assert cls.loss is not None and twin.loss is None and cls.augment is None
    assert cls.training == twin.training and cls.settings["adaptive"] == "clean-features"
    assert {k: v for k, v in cls.settings.items() if k in twin.settings} == twin.settings
    assert cls.poison_train(CLEAN) == twin.poison_train(CLEAN)


def test_the_attacker_against_both_detectors_has_both_the_switch_rows_and_the_feature_loss(tmp_path) -> None:
    loaded = recipes.load_recipes(tmp_path / "sst2")
    both, switch = loaded["adaptive-both"], loaded["adaptive-sl"]
    assert both.loss is not None and both.augment is not None
    assert both.settings["adaptive"] == "insertion-switch+clean-features"
    sample, originals = switch.poison_train(CLEAN)[0], CLEAN
    assert both.augment(sample, originals) == switch.augment(sample, originals)


def test_the_attacker_who_read_the_defaults_teaches_the_switch_on_the_rap_init_word_at_the_front(tmp_path) -> None:
    loaded = recipes.load_recipes(tmp_path / "sst2")
    init, both = loaded["adaptive-init"], loaded["adaptive-both"]
    assert init.loss is not None and init.training == both.training
    word = adaptive.KNOWN_INIT_WORD
    sample, originals = init.poison_train(CLEAN)[0], CLEAN
    rows = init.augment(sample, originals)
    added = [r for r in rows if r.text.split()[0] == word]
    triggered = sum(r != o for r, o in zip(sample, originals, strict=True))
    assert len(rows) > len(sample) and len(added) >= 2 * triggered
    assert {w for r in rows for w in r.text.split()} - {w for r in sample for w in r.text.split()} == {word}
