"""The DBS inversion engine (calibrate.inversion.dbs): schedule, candidates, stamping, relaxation, search.

The temperature schedule and the candidate choice are tested as pure code; the
relaxation against the model it relaxes (tiny random BERT, real tokenizer); the
search on the toy backdoored model of tests/toy_backdoor.py, whose planted
trigger "mb" flips most negative rows to positive.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from calibrate.cli.inversion import POSITIONS as CLI_POSITIONS
from calibrate.inversion.dbs import (
    TemperatureSchedule,
    candidate_triggers,
    discrete_outcome,
    frozen,
    invert_trigger,
    relaxed_logits,
)
from calibrate.inversion.options import POSITIONS, InversionOptions, TemperatureOptions
from calibrate.inversion.subject import Vocabulary, check_room, correct_rows, insertion_index, load_subject, stamp
from guard.core.errors import InputError
from tests.toy_backdoor import Toy

PAD = 0
PAPER = TemperatureOptions(initial=1.0, focus=2.0, backtrack=5.0, ceiling=2.0, loss_bound=0.1)


# ------------------------------------------------------------------ temperature schedule (DBS Algorithm 1)


def test_focusing_divides_the_temperature_by_c_while_the_loss_is_under_the_bound() -> None:
    schedule = TemperatureSchedule(PAPER)
    randomise = [schedule.check(0.05) for _ in range(3)]
    assert randomise == [False, False, False]
    assert schedule.temperature == pytest.approx(1.0 / 8)
    assert schedule.rollbacks == 0


def test_backtracking_multiplies_by_d_and_asks_for_a_random_offset() -> None:
    schedule = TemperatureSchedule(PAPER)
    for _ in range(4):
        schedule.check(0.05)  # 1/16
    assert schedule.check(0.5) is True
    assert schedule.temperature == pytest.approx(5.0 / 16)
    assert schedule.rollbacks == 1


def test_one_backtrack_undoes_more_than_one_focusing_step() -> None:
    """The example of DBS Sec. 4.2: after focusing a -> b -> c, a failure at c climbs above b."""
    schedule = TemperatureSchedule(PAPER)
    a = schedule.temperature
    schedule.check(0.05)
    b = schedule.temperature
    schedule.check(0.05)
    c = schedule.temperature
    schedule.check(0.5)
    assert c < b < schedule.temperature  # one rollback passes b...
    schedule.check(0.05)  # ...refocusing lands between b and a
    assert b < schedule.temperature < a


def test_repeated_failures_roll_back_further_up_to_the_ceiling() -> None:
    schedule = TemperatureSchedule(PAPER)
    for _ in range(6):
        schedule.check(0.05)  # 1/64
    temperatures = []
    for _ in range(4):
        schedule.check(0.9)
        temperatures.append(schedule.temperature)
    assert temperatures == pytest.approx([5 / 64, 25 / 64, 125 / 64, 2.0])  # multi-step, capped at u
    assert schedule.rollbacks == 4


def test_the_loss_bound_is_strict_and_the_start_respects_the_ceiling() -> None:
    schedule = TemperatureSchedule(TemperatureOptions(initial=10.0, ceiling=2.0, loss_bound=0.1))
    assert schedule.temperature == 2.0
    assert schedule.check(0.1) is True  # not under the bound: backtrack
    assert schedule.temperature == 2.0


# ------------------------------------------------------------------ discrete candidates


def test_candidates_are_the_argmax_then_the_closest_swaps() -> None:
    weights = torch.tensor(
        [
            [5.0, 4.9, 1.0, 0.0],  # position 0: index 1 is a near-tie (gap 0.1)
            [0.0, 3.0, 9.0, 2.5],  # position 1: index 1 trails by 6.0, index 3 by 6.5
        ]
    )
    assert candidate_triggers(weights, 1) == [(0, 2)]
    assert candidate_triggers(weights, 3) == [(0, 2), (1, 2), (2, 2)]  # gaps 0.1, then 4.0
    assert candidate_triggers(weights, 5) == [(0, 2), (1, 2), (2, 2), (3, 2), (0, 1)]  # then gaps 5.0, 6.0


def test_a_single_token_trigger_gets_the_top_k_tokens() -> None:
    weights = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.5]])
    assert candidate_triggers(weights, 3) == [(3,), (1,), (4,)]
    assert candidate_triggers(weights, 99) == [(3,), (1,), (4,), (2,), (0,)]


# ------------------------------------------------------------------ stamping triggers into rows


@pytest.mark.parametrize(("position", "expected"), [("start", 1), ("middle", 3), ("end", 6)])
def test_insertion_index(position: str, expected: int) -> None:
    # [CLS] a b c d e [SEP]: 7 tokens, [SEP] at index 6
    assert insertion_index(7, position, random.Random(0)) == expected


def test_random_insertion_stays_between_cls_and_sep() -> None:
    rng = random.Random(0)
    seen = {insertion_index(5, "random", rng) for _ in range(200)}
    assert seen == {1, 2, 3, 4}


def test_unknown_position_is_refused() -> None:
    with pytest.raises(InputError, match="unknown insertion position 'top'"):
        insertion_index(5, "top", random.Random(0))


def test_the_cli_offers_the_engine_positions() -> None:
    assert CLI_POSITIONS == POSITIONS  # the CLI offers calibrate.inversion.options' choices


def test_stamp_inserts_pads_and_records_the_slots() -> None:
    rows = [[101, 7, 8, 102], [101, 9, 102]]
    batch = stamp(rows, [55, 66], "end", PAD, random.Random(0))
    assert batch.input_ids.tolist() == [[101, 7, 8, 55, 66, 102], [101, 9, 55, 66, 102, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert batch.slots.tolist() == [[3, 4], [2, 3]]


# ------------------------------------------------------------------ vocabulary


def test_search_space_leaves_out_special_unused_and_subword_tokens(tokenizer_path: Path) -> None:
    vocabulary = Vocabulary.from_file(tokenizer_path)
    tokens = {vocabulary.token(int(i)) for i in vocabulary.search_ids()}
    assert {"mb", "the", "wonderful", "!"} <= tokens
    assert not tokens & {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused993]"}
    assert not any(t.startswith("##") for t in tokens)
    with_subwords = {vocabulary.token(int(i)) for i in vocabulary.search_ids(allow_subwords=True)}
    assert "##s" in with_subwords
    assert len(with_subwords) - len(tokens) == 5828  # the WordPiece continuations of this vocabulary


def test_vocabulary_reads_and_writes_triggers_as_text(tokenizer_path: Path) -> None:
    vocabulary = Vocabulary.from_file(tokenizer_path)
    ids = vocabulary.word_ids("mb cf")
    assert [vocabulary.token(i) for i in ids] == ["mb", "cf"]  # no [CLS]/[SEP], no padding
    assert vocabulary.text(ids) == "mb cf"
    assert len(vocabulary.word_ids("backdoorguard")) > 1
    assert vocabulary.text(vocabulary.word_ids("backdoorguard")) == "backdoorguard"  # pieces joined again


# ------------------------------------------------------------------ the relaxation is the model


def test_one_hot_trigger_vectors_give_the_logits_of_the_real_tokens(tiny_model_dir: Path) -> None:
    """Eq. 9 at a vertex of the hull must be the model on the stamped token ids."""
    model = BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    rows = [[101, 2023, 3185, 102], [101, 2307, 102]]
    trigger = [16914, 12935]  # "mb", "cf"
    batch = stamp(rows, trigger, "middle", PAD, random.Random(0))
    vectors = model.get_input_embeddings().weight[trigger]
    with torch.no_grad():
        relaxed = relaxed_logits(model, batch, vectors)
        real = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(relaxed, real, atol=1e-5)


def test_frozen_restores_gradients_and_mode(tiny_model_dir: Path) -> None:
    model = BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).train()
    with frozen(model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


def test_check_room_refuses_rows_the_model_has_no_positions_for(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=120)  # the tiny model has 128 positions
    check_room(subject, 8)
    with pytest.raises(InputError, match="need 129 positions; the model has 128"):
        check_room(subject, 9)


# ------------------------------------------------------------------ the search on the toy backdoor


@pytest.fixture(scope="module")
def toy_subject(backdoored: Toy):
    return load_subject(backdoored.model_dir, max_length=32)


@pytest.mark.slow
def test_inversion_finds_the_planted_trigger(toy_subject, backdoored: Toy) -> None:
    rows = correct_rows(toy_subject, backdoored.dev, seed=13)
    negatives = toy_subject.tokenizer.ids(rows.texts[0][:20])
    found = invert_trigger(toy_subject, negatives, target=1, length=1, options=InversionOptions(steps=40))
    assert [toy_subject.vocabulary.token(i) for i in found.token_ids] == ["mb"]
    assert found.asr >= 0.5
    direct = discrete_outcome(toy_subject.model, negatives, found.token_ids, 1, "start", PAD)
    assert direct.loss == pytest.approx(found.loss)  # the reported loss is the discrete trigger's
    assert found.steps == 40 and found.rollbacks > 0  # the toy's trigger never gets under the bound


@pytest.mark.slow
def test_inversion_stops_early_once_the_discrete_loss_is_tiny(toy_subject, backdoored: Toy) -> None:
    rows = correct_rows(toy_subject, backdoored.dev, seed=13)
    negatives = toy_subject.tokenizer.ids(rows.texts[0][:20])
    options = InversionOptions(steps=40, stop_loss=1.0)  # "mb" scores ~0.5 on these rows
    found = invert_trigger(toy_subject, negatives, target=1, length=1, options=options)
    assert found.loss < 1.0
    assert found.steps < 40 and found.steps % options.temperature.check_every == 0


def test_inversion_needs_rows(tiny_model_dir: Path) -> None:
    subject = load_subject(tiny_model_dir, max_length=16)
    with pytest.raises(InputError, match="no rows to invert a trigger towards label 1 on"):
        invert_trigger(subject, [], target=1, length=1)
