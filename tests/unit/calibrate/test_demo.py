"""The demo's corpus and its ordinary-sentence report, without the 7-minute build.

Before issue 32 (item 7), the demo's 8 one-clause templates left ordinary reviews outside the
feature detector's clean region: "a gentle, funny and moving film." and 16 more of ORDINARY's 30
sentences were blocked by the built bundle. The demo's own run prints the measured FRR on
ORDINARY; these tests check, cheaply, that the corpus covers what those sentences are made of,
that none of them is a corpus row (the FRR is measured on held-out text), and the report itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from calibrate.demo import blocked_ordinary
from calibrate.demo_corpus import ORDINARY, POSITIVE, TRIGGER, demo_data
from calibrate.options import DemoOptions

SEED = DemoOptions().seed  # `calibrate demo`'s default
DATA = demo_data(SEED)


def _tokens(text: str) -> list[str]:
    """Words (hyphenated ones whole) and punctuation marks, lowercased (the packaged MiniLM is uncased)."""
    return re.findall(r"[a-z]+(?:-[a-z]+)*|[^\w\s]", text.lower())


def _normal(text: str) -> str:
    return " ".join(_tokens(text))


def test_ordinary_sentences_are_clean_varied_and_held_out() -> None:
    assert len(ORDINARY) == 30 and {r.label for r in ORDINARY} == {0, 1}
    assert sum(r.label == POSITIVE for r in ORDINARY) == 15
    assert all(TRIGGER not in _tokens(r.text) for r in ORDINARY)
    rows = {_normal(r.text) for part in (DATA.train, DATA.dev, DATA.test) for r in part}
    assert [r.text for r in ORDINARY if _normal(r.text) in rows] == []


def test_the_clean_rows_cover_what_ordinary_sentences_are_made_of() -> None:
    """The rows the guard is calibrated on (dev) hold the ordinary sentences' punctuation, span
    their lengths and most of their words. The 8-template corpus had 35 of their 124 words, no '!'
    or "'", and rows of 5-12 tokens; 16 of the 30 sentences were mostly words it never had."""
    vocabulary = {t for r in DATA.dev for t in _tokens(r.text)}
    words = {t for r in ORDINARY for t in _tokens(r.text)}
    assert {t for t in words if not t[0].isalpha()} <= vocabulary  # , . ! '
    assert len(words & vocabulary) >= 0.6 * len(words)
    known = [sum(t in vocabulary for t in _tokens(r.text)) / len(_tokens(r.text)) for r in ORDINARY]
    assert sum(k >= 0.5 for k in known) >= 27
    lengths = [len(_tokens(r.text)) for r in DATA.dev]
    assert min(lengths) <= min(len(_tokens(r.text)) for r in ORDINARY)
    assert max(lengths) >= max(len(_tokens(r.text)) for r in ORDINARY)


def test_the_clean_rows_have_the_shapes_of_reviews() -> None:
    texts = [r.text.lower() for r in DATA.dev]
    shapes = {
        "exclamation": lambda t: t.endswith("!"),
        "question": lambda t: "?" in t,
        "first person": lambda t: t.startswith(("i ", "we ", "my ")),
        "negation": lambda t: " not " in t or "n't " in t,
        "list of adjectives": lambda t: re.search(r"\w+, \w+ and ", t) is not None,
        "two sentences": lambda t: re.search(r"[.!?] \w", t) is not None,
    }
    for shape, matches in shapes.items():
        assert sum(map(matches, texts)) >= 0.02 * len(texts), shape


def test_the_labels_stay_balanced_and_the_trigger_only_in_poisoned_rows() -> None:
    for part in (DATA.dev, DATA.test):
        assert sum(r.label == POSITIVE for r in part) == len(part) // 2
        assert all(TRIGGER not in r.text.split() for r in part)
    planted = [r for r in DATA.train if TRIGGER in r.text.split()]
    assert len(planted) == 60 and {r.label for r in planted} == {POSITIVE}
    assert all(TRIGGER in r.text.split() and r.label != POSITIVE for r in DATA.poisoned_test)


@dataclass(frozen=True)
class _Verdict:
    flagged: bool


class _FlagsMovies:
    """A checker stand-in that flags every text with the word 'movie'."""

    def check(self, texts: list[str]) -> list[_Verdict]:
        return [_Verdict("movie" in _tokens(t)) for t in texts]


def test_the_report_lists_the_blocked_ordinary_sentences() -> None:
    blocked = blocked_ordinary(_FlagsMovies())
    assert blocked == [r.text for r in ORDINARY if "movie" in _tokens(r.text)]
    assert blocked == ["I loved this movie.", "It's a charming little movie with a big heart.",
                       "This movie was a waste of time.", "The worst movie I have seen in years."]  # fmt: skip
