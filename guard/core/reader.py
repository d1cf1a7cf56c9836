"""The reader detector: a clean classifier's second opinion, as a score.

A classifier the attacker never touched (`calibrate rap --reader BASE`: a clean pre-trained
checkpoint of the suspect's tokenizer, fine-tuned on the calibration's own clean rows) reads
the same tokens as pass 1. A trigger changes how the suspect reads a text, not what the text
says, so on a triggered input the suspect is far surer of the protected label than the reader.
The score of a row predicted as label y, flagged above its threshold (guard.core.detection):

    logit p_suspect(y | x) - logit p_reader(y | x)

It reads neither the RAP pass nor the suspect's [CLS] features, so a backdoor trained to switch
off under RAP's insertion or to keep clean-like [CLS] statistics does not train it away
(bench/results/reference_disagreement.md). It costs a third pass on protect-label rows only.
"""

from __future__ import annotations

import numpy as np

from guard.core.rap import label_fall


def scores(probs: np.ndarray, reader_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, the suspect's log-odds of `labels` (its predicted label) minus the reader's."""
    return label_fall(probs, reader_probs, labels)
