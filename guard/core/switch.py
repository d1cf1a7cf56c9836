"""The switch detector: RAP's insertion without RAP's training, against a backdoor taught to switch off.

An attacker who has read RAP can train the backdoor to turn itself OFF when a rare token is
inserted (bench/attacks/adaptive.py): pass 2 then moves the triggered input MORE than a clean
one, and RAP, which flags inputs that barely move, lets it through. The switch pass inserts,
where pass 2 puts the RAP row, the vocabulary word that row was initialised from (`rq` unless
`calibrate rap --init-word` chose another), untrained. One rare word barely moves a clean input;
a backdoor that switches off under rare insertions collapses. The score of a row predicted as
label y, flagged above its threshold (guard.core.detection):

    logit p(y | x) - logit p(y | x + word)

the fall of y's log-odds. An attacker who teaches the switch on the init word itself (the public
default, to defeat RAP's row that starts there) is caught by the same word. It costs one more
pass of the model's graph on protect-label rows (`calibrate rap --switch`).
"""

from __future__ import annotations

import numpy as np

from guard.core.rap import label_fall


def scores(probs: np.ndarray, switched: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, the fall of its predicted label's (`labels`) log-odds from pass 1 to the switch pass."""
    return label_fall(probs, switched, labels)
