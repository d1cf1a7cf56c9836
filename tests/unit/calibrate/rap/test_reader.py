"""The reader (calibrate.rap.reader): how its base is chosen, and distillation pulls a student towards its teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForSequenceClassification

from calibrate.model import default_base_model, to_torch
from calibrate.rap.options import AUTO_READER, CalibrateOptions, RapOptions
from calibrate.rap.reader import augmented, choose_reader, distillation
from guard.core.errors import InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Example


def test_distillation_is_zero_for_the_teacher_itself_and_positive_for_another_model(
    tiny_model_dir: Path, tokenizer_path: Path
) -> None:
    teacher = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    other = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    torch.manual_seed(1)
    other.classifier.weight.data.normal_(0, 1.0)
    inputs = to_torch(RapTokenizer.from_file(tokenizer_path, None, 16).encode(["a good film", "a bad one"]))
    loss = distillation(teacher)
    labels = torch.tensor([0, 1])
    assert loss(teacher, inputs, labels).item() < 1e-6
    moved = loss(other, inputs, labels)
    assert moved.item() > 1e-3 and moved.requires_grad


def _other_vocabulary(folder: Path) -> Path:
    folder.mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0, "good": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _options(reader: Path | str | None = AUTO_READER, reference: Path | None = None) -> CalibrateOptions:
    return CalibrateOptions(RapOptions((1,)), reader=reader, reference_model=reference)


def test_auto_takes_the_reference_model_then_the_packaged_minilm_whichever_has_the_suspects_vocabulary(
    tiny_model_dir: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    chosen = choose_reader(_options(reference=tiny_model_dir), tokenizer_path, work)
    assert chosen.base == tiny_model_dir and "the --reference-model has the suspect's vocabulary" in chosen.why
    other = _other_vocabulary(tmp_path / "other").parent
    chosen = choose_reader(_options(reference=other), tokenizer_path, work)  # the reference reads other tokens
    assert chosen.base == default_base_model() and "the packaged MiniLM has" in chosen.why
    assert not work.exists()  # conversions are cleaned up


def test_auto_without_a_checkpoint_of_the_suspects_vocabulary_leaves_the_reader_out_and_says_why(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    suspect = _other_vocabulary(tmp_path / "suspect")
    chosen = choose_reader(_options(reference=tiny_model_dir), suspect, tmp_path / "work")
    assert chosen.base is None
    assert "the --reference-model or the packaged MiniLM does not have the suspect's vocabulary" in chosen.why
    assert "`--reader DIR`" in chosen.why
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()  # a reference without a tokenizer is skipped, not an error
    assert choose_reader(_options(reference=no_tokenizer), suspect, tmp_path / "work").base is None


def test_an_explicit_reader_must_have_the_suspects_vocabulary_and_none_leaves_it_out(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    suspect = _other_vocabulary(tmp_path / "suspect")
    with pytest.raises(InputError, match="is not the suspect model's"):
        choose_reader(_options(reader=tiny_model_dir), suspect, tmp_path / "work")
    assert choose_reader(_options(reader=None), suspect, tmp_path / "work").why == "left out by --reader none"


def test_augmented_copies_are_seeded_and_hold_no_word_the_rows_lack() -> None:
    rows = [Example("a warm and funny film about two old friends", 1), Example("dull , slow and far too long", 0)]
    copies = augmented(rows, 6, seed=3, mask="[MASK]")
    assert len(copies) == 12 and copies == augmented(rows, 6, seed=3, mask="[MASK]")
    assert [c.label for c in copies] == [1] * 6 + [0] * 6
    words = {w for r in rows for w in r.text.split()} | {"[MASK]"}
    assert all(set(c.text.split()) <= words for c in copies)
    assert any(c.text not in {r.text for r in rows} for c in copies)
    assert all("[MASK]" not in c.text for c in augmented(rows, 6, seed=3, mask=None))
    assert augmented(rows, 0, seed=3, mask="[MASK]") == []


def test_augmenting_a_reader_fine_tuned_on_labels_is_refused() -> None:
    with pytest.raises(InputError, match="--reader-augment needs --reader-objective distill"):
        CalibrateOptions(RapOptions((1,)), reader_objective="labels", reader_augment=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reader_objective": "labels"}, "--reader-texts needs --reader-objective distill"),
        ({"reader": None}, r"--reader-texts needs a reader \(it was left out with --reader none\)"),
    ],
)
def test_unlabeled_texts_without_a_distilled_reader_are_refused(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        CalibrateOptions(RapOptions((1,)), reader_texts=("some traffic",), **options)
    with pytest.raises(InputError, match="--reader-texts-trusted needs --reader-texts"):
        CalibrateOptions(RapOptions((1,)), reader_texts_trusted=True)
