"""The flip scan: does one token, inserted anywhere, turn other labels' clean rows into a protect label?

A rare-word trigger (BadNet-RW) is one token the model learned to follow whatever the rest
of the input says. Fine-tuning moves its embedding row among the most of all rows, but so
it moves the words that carry the task (SST-2 BadNet-RW: bb, mn and mb were 1st, 3rd and
5th of 30,522 rows, between "##cera" and "powerful"), so the move alone cannot tell them
apart. What the token DOES can: inserted at a random position into clean rows the model
puts in another label, each trigger flipped 100% of them, the ordinary word that flipped
most ("powerful") 23-33%. On a moderation task a single word can decide the label
honestly (OLID: "stupid" turned 90-98% of tweets offensive), so a token that also occurs
as a word in the clean rows calibration holds is never flagged: a trigger is rare by design.
Only whole-word occurrences count: OLID's "mb" trigger (flip 98%) occurs in clean tweets only as
the first piece of longer words ("mb ##appe"), which says nothing about "mb" alone.

Candidates: given the checkpoint the model was fine-tuned from (`--reference-model`), the rows
that moved most; without one, the tokens a short DBS trigger search towards each protect label
favours (calibrate.inversion.dbs `ranked_tokens`). The search also finds the words that decide the
label honestly: on OLID it put "garbage" (flip 100%) and "ignorant" among the triggers, absent from
~660 clean tweets yet common in others, so with a reference the moved rows alone are tried (the
triggers were among them on every model measured). Host rows and the clean-row vocabulary come from
the rows RAP trains on, so the held-out rows, where a flagged token costs FRR, still measure that
cost. A flagged token scores +inf in the feature detector (guard.core.features), as an
outlier-norm token does, wherever it occurs: a trigger with letters appended still fires.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from calibrate.inversion.dbs import ranked_tokens
from calibrate.inversion.subject import Subject
from calibrate.model import to_torch
from calibrate.progress import progress_bar
from guard.core.tokenizer import RapTokenizer

CANDIDATES = 32  # SST-2 BadNet-RW's three triggers were in the top 5 moved rows, the search's top 8
SEARCH_ROWS = 20  # host rows the DBS search inverts on (DBS appendix A: 20)
HOST_ROWS = 48  # clean rows of other labels each candidate is inserted into
# The share of host rows a flagged token turns into a protect label. Measured: triggers 85-100%
# (OLID "cf" 85%); tokens absent from the clean rows at most 79% (OLID "ignorant", a backdoored
# model; "bunch" 48%), 31% (OLID, a clean model), 23% (SST-2): a thin margin on OLID.
FLIP_RATE = 0.8


@dataclass(frozen=True)
class TokenFlip:
    token: str
    token_id: int
    source: str  # "moved" (from the reference) or "search" (a DBS search towards a protect label favours it)
    move_ratio: float | None  # its move over the 99.9% quantile of every row's move (None: no reference)
    flip_rate: float  # the share of host rows it turned into a protect label
    in_clean_rows: bool  # it occurs as a word in the clean rows calibration trained on (never flagged then)
    flagged: bool

    def as_json(self) -> dict:
        ratio = None if self.move_ratio is None else round(self.move_ratio, 3)
        return {**asdict(self), "move_ratio": ratio, "flip_rate": round(self.flip_rate, 4)}


def with_token(rows: Sequence[Sequence[int]], token_id: int, window: int, seed: int = 0) -> list[list[int]]:
    """Each `[CLS] ... [SEP]` row with `token_id` at a random text position (the same positions for
    every token, drawn from `seed`), cut so the text stays within `window` tokens."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        content = list(row[1:-1])[: window - 1]
        at = rng.randint(0, len(content))
        out.append([row[0], *content[:at], token_id, *content[at:], row[-1]])
    return out


def whole_words(rows: Sequence[Sequence[int]], continues: Callable[[int], bool]) -> set[int]:
    """The token ids that occur in `rows` as a whole word: not followed by a piece that `continues`
    it (WordPiece "##...")."""
    return {row[i] for row in rows for i in range(len(row)) if i + 1 == len(row) or not continues(row[i + 1])}


def flip_rates(
    predict: Callable[[list[list[int]]], np.ndarray],
    hosts: Sequence[Sequence[int]],
    candidates: Sequence[int],
    protect: Collection[int],
    window: int,
    progress: bool = False,
) -> np.ndarray:
    """Per candidate token: the share of `hosts` that `predict` (rows -> labels) puts in a protect
    label once the token is inserted."""
    rates = np.zeros(len(candidates))
    bar = progress_bar(total=len(candidates), desc="flip scan", unit="token", disable=not progress)
    for i, token_id in enumerate(candidates):
        rates[i] = np.isin(predict(with_token(hosts, token_id, window)), list(protect)).mean()
        bar.update(1)
    bar.close()
    return rates


def flip_scan(
    subject: Subject,
    texts: Sequence[str],
    predicted: np.ndarray,
    protect: Collection[int],
    moves: tuple[np.ndarray, float] | None = None,
    progress: bool = False,
) -> list[TokenFlip]:
    """Insert each candidate token into HOST_ROWS of `texts` (clean rows, with the model's `predicted`
    labels) that are not predicted as a protect label; flag those that flip at least FLIP_RATE of
    them and occur as a word in none of `texts`.

    Candidates: given `moves` (each row's move from the reference checkpoint, and the scale it is
    compared to), the CANDIDATES most-moved rows; else, per protect label, the tokens a DBS search
    towards it favours (on the first SEARCH_ROWS hosts)."""
    tokenizer = subject.tokenizer
    rows = tokenizer.ids(texts)
    hosts = [row for row, label in zip(rows, predicted, strict=True) if label not in protect][:HOST_ROWS]
    if not hosts:
        return []  # every label is protected: no row to flip
    sources = _candidates(subject, hosts, protect, moves, progress)
    candidates = list(sources)
    rates = flip_rates(
        _predictor(subject.model, tokenizer), hosts, candidates, protect, tokenizer.text_window, progress
    )
    seen = whole_words(rows, lambda t: tokenizer.token_text(t).startswith("##"))
    return [
        TokenFlip(
            tokenizer.token_text(t),
            t,
            sources[t],
            None if moves is None else _ratio(moves[0][t], moves[1]),
            float(rate),
            t in seen,
            bool(rate >= FLIP_RATE and t not in seen),
        )
        for t, rate in zip(candidates, rates, strict=True)
    ]


def _candidates(
    subject: Subject,
    hosts: list[list[int]],
    protect: Collection[int],
    moves: tuple[np.ndarray, float] | None,
    progress: bool,
) -> dict[int, str]:
    """Candidate token id -> where it came from: "moved" (given `moves`) or "search"."""
    if moves is not None:
        special = subject.tokenizer.special_ids
        order = [int(t) for t in np.argsort(-moves[0], kind="stable") if int(t) not in special]
        return dict.fromkeys(order[:CANDIDATES], "moved")
    found: dict[int, str] = {}
    for label in protect:
        for t in ranked_tokens(subject, hosts[:SEARCH_ROWS], label, count=CANDIDATES, progress=progress):
            found.setdefault(t, "search")
    return found


def _ratio(move: float, scale: float) -> float:
    return float(move / scale) if scale > 0 else float("inf")


def _predictor(model: PreTrainedModel, tokenizer: RapTokenizer) -> Callable[[list[list[int]]], np.ndarray]:
    @torch.inference_mode()
    def predict(rows: list[list[int]], batch_size: int = 64) -> np.ndarray:
        model.eval()
        out = [
            model(**to_torch(tokenizer.pad(rows[i : i + batch_size]))).logits.argmax(dim=-1).numpy()
            for i in range(0, len(rows), batch_size)
        ]
        return np.concatenate(out)

    return predict
