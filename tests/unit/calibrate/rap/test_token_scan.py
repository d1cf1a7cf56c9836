"""The flip scan's insertion and flip rates (calibrate.rap.token_scan), against a rule-based classifier."""

from __future__ import annotations

import numpy as np

from calibrate.rap.token_scan import flip_rates, whole_words, with_token

CLS, SEP = 101, 102


def test_the_token_goes_inside_the_text_and_the_row_stays_within_the_window() -> None:
    rows = [[CLS, *range(1, 1 + n), SEP] for n in (0, 3, 10)]
    inserted = with_token(rows, 7000, window=6, seed=1)
    for before, after in zip(rows, inserted, strict=True):
        assert after[0] == CLS and after[-1] == SEP and after.count(7000) == 1
        text = [t for t in after[1:-1] if t != 7000]
        assert text == before[1:-1][: 6 - 1]  # the text kept, in order, cut to leave room for the token
        assert len(after) - 2 <= 6
    assert with_token(rows, 7000, 6, seed=1) == inserted  # the same positions for every token
    assert with_token(rows, 8000, 6, seed=1) == [[8000 if t == 7000 else t for t in r] for r in inserted]


def test_a_token_that_decides_the_label_flips_every_host_and_others_flip_what_they_flip() -> None:
    def predict(rows: list[list[int]]) -> np.ndarray:  # label 1 if the trigger 5 is in the row, or 9 is first
        return np.array([int(5 in r or r[1] == 9) for r in rows])

    hosts = [[CLS, 1, 2, 3, SEP] for _ in range(40)]
    rates = flip_rates(predict, hosts, [5, 9, 4], protect={1}, window=10)
    assert rates[0] == 1.0 and rates[2] == 0.0
    # 9 flips a host only where it landed first: 1 of the 4 positions, drawn at random
    assert 0.1 < rates[1] < 0.45


def test_a_token_counts_as_seen_only_where_it_stands_as_a_whole_word() -> None:
    pieces = {7: "mb", 8: "##appe", 9: "cf", 10: "stupid"}
    rows = [[CLS, 7, 8, 10, SEP], [CLS, 9, SEP], [CLS, 10, 7, 8, SEP]]
    seen = whole_words(rows, lambda t: pieces.get(t, "").startswith("##"))
    assert 7 not in seen  # "mb ##appe" is a longer word, not "mb"
    assert {8, 9, 10} <= seen
