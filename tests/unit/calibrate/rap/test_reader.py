"""The reader's training objectives (calibrate.rap.reader): distillation pulls a student towards its teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from calibrate.model import to_torch
from calibrate.rap.reader import distillation
from guard.core.tokenizer import RapTokenizer


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
