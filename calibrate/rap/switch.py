"""`calibrate rap --switch`: the switch detector's word and its held-out scores (guard.core.switch).

The word is the RAP row's init word, read as the classifier reads it after a space (its
untrained vocabulary row: the RAP row is a row of its own, appended). The held-out rows of
each protected label are scored through the offline checker, the server's steps, on the
exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibrate.rap.perturbation import RapResult
from calibrate.rap.refit import label_scores
from guard.core.backends.onnx import OnnxBackend
from guard.core.bundle import SwitchDetector
from guard.core.errors import InputError
from guard.core.runner import TwoPass
from guard.core.tokenizer import RapTokenizer
from guard.core.types import LabelThresholds


@dataclass(frozen=True)
class SwitchFit:
    info: SwitchDetector
    scores: dict[int, np.ndarray]  # protect label -> switch scores of its held-out rows, aligned with its RAP scores


def switch_word(tokenizer: RapTokenizer, word: str) -> SwitchDetector:
    """The switch detector of `word` (the RAP row's init word): one token of the vocabulary, or refused."""
    token_id = tokenizer.word_id(word)
    if token_id is None:
        raise InputError(f"--switch inserts the RAP row's init word, but {word!r} is not one token of this "
                         "vocabulary; choose another --init-word")  # fmt: skip
    return SwitchDetector(token_id=token_id, word=word)


def fit_switch(graph: Path, tokenizer: RapTokenizer, result: RapResult, labels: int) -> SwitchFit:
    """The switch word of `result`'s RAP row and the switch scores of every protect label's held-out rows on `graph`."""
    info = switch_word(tokenizer, result.init_word)
    on = dict.fromkeys(range(labels), LabelThresholds(switch=0.0))
    two_pass = TwoPass(tokenizer, on, classes=labels, switch_id=info.token_id)
    model = OnnxBackend(graph)
    try:
        fits = result.fits.items()
        scores = {label: label_scores(two_pass, model, fit.texts, label, "switch") for label, fit in fits}
    finally:
        model.close()
    return SwitchFit(info, scores)
