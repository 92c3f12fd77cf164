"""Continual-learning metrics on hand-made matrices."""

from __future__ import annotations

import pytest

from gorp.metrics import exact_match, normalize_answer, summarize

# R[t][i], 3 tasks; None where a stage has not scored a task (FWT needs R[i-1][i], here given)
R = [
    [0.8, 0.3, 0.2],
    [0.6, 0.9, 0.4],
    [0.7, 0.5, 0.7],
]
ZERO_SHOT = [0.1, 0.2, 0.3]


def test_metrics_on_hand_made_matrix():
    m = summarize(R, ZERO_SHOT)
    assert m["aa"] == pytest.approx((0.7 + 0.5 + 0.7) / 3)
    assert m["bwt"] == pytest.approx(((0.7 - 0.8) + (0.5 - 0.9)) / 2)
    assert m["fwt"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)
    # task 0: max over stages 0, 1 of R[t][0] - R[2][0] = max(0.1, -0.1); task 1: stage 1 only: 0.4
    assert m["forgetting"] == pytest.approx((0.1 + 0.4) / 2)


def test_partial_matrix_and_missing_entries():
    partial = [[0.5, None], [0.4, 0.6]]
    m = summarize(partial, [0.1, 0.2])
    assert m["aa"] == pytest.approx(0.5) and m["bwt"] == pytest.approx(-0.1) and m["fwt"] is None
    single = summarize([[0.9]])
    assert single == {"aa": 0.9, "bwt": None, "fwt": None, "forgetting": None}
    with pytest.raises(ValueError, match=r"R\[1\]\[1\] is missing"):
        summarize([[0.5, None], [0.4, None]])


def test_exact_match_normalization():
    assert normalize_answer("  Computer-Science. ") == "computer science"
    assert exact_match("Yes!", "yes") and exact_match("computer science", "Computer  Science")
    assert not exact_match("no", "yes")
