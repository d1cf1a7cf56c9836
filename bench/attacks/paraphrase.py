"""Attacks whose trigger is a way of writing, not a token: syntactic and style.

- syntactic: HiddenKiller (Qi et al. 2021), SCPN paraphrases into one rare syntactic
  template (`S(SBAR)(,)(NP)(VP)(.)`).
- style: StyleBkd (Qi et al. 2021), STRAP style transfer (Bible style by default).

The paraphrases come pre-generated (`<data>/poison/<attack>/{train,test}.tsv`, made by
the attacks' authors; no paraphraser runs here). Their training files are aligned
with the clean training file (row k is a paraphrase of clean row k, same label), so the
training set is poisoned in place, as in the papers: `rate` of the clean non-target
rows that have a paraphrase are swapped for it and relabelled to the target.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from guard.core.errors import InputError
from guard.core.types import Example


def poison_aligned(
    clean: Sequence[Example], paraphrases: Sequence[Example], target: int, rate: float, seed: int = 0
) -> tuple[list[Example], int]:
    """Replace `rate` of the non-target clean rows by their paraphrase, labelled `target`.

    `paraphrases[k]` must be a rewrite of `clean[k]` (it may cover only a prefix of
    `clean`). At most as many rows are poisoned as there are non-target paraphrases.
    """
    if len(paraphrases) > len(clean):
        raise InputError(f"{len(paraphrases)} paraphrases for {len(clean)} clean rows: files are not aligned")
    mismatched = sum(p.label != c.label for p, c in zip(paraphrases, clean, strict=False))
    if mismatched:
        raise InputError(f"{mismatched} paraphrase rows have a different label from their clean row: not aligned")
    candidates = [k for k, p in enumerate(paraphrases) if p.label != target]
    wanted = round(rate * sum(r.label != target for r in clean))
    chosen = set(random.Random(seed).sample(candidates, min(wanted, len(candidates))))
    out = [Example(paraphrases[k].text, target) if k in chosen else row for k, row in enumerate(clean)]
    return out, len(chosen)
