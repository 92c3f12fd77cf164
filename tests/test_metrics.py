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


# 4 tasks, built so that each wrong variant of a formula gives another number (DESIGN.md section 4, 0-based here):
# task 0 improves after its stage (0.5 -> 0.8) and then drops; task 1 scores 0.9 at stage 0, before it is learned, and
# then improves steadily (its forgetting is negative); task 2 is forgotten.
R4 = [
    [0.50, 0.90, 0.10, 0.20],
    [0.80, 0.55, 0.30, 0.25],
    [0.70, 0.58, 0.85, 0.35],
    [0.60, 0.70, 0.40, 0.90],
]
ZERO_SHOT4 = [0.1, 0.2, 0.3, 0.4]
RIGHT = {
    "aa": (0.60 + 0.70 + 0.40 + 0.90) / 4,
    "bwt": ((0.60 - 0.50) + (0.70 - 0.55) + (0.40 - 0.85)) / 3,
    "fwt": ((0.90 - 0.2) + (0.30 - 0.3) + (0.35 - 0.4)) / 3,
    # max over the stages t in [i, T-2] that had learned task i, of R[t][i] - R[T-1][i]
    "forgetting": (max(0.50 - 0.60, 0.80 - 0.60, 0.70 - 0.60) + max(0.55 - 0.70, 0.58 - 0.70) + (0.85 - 0.40)) / 3,
}
WRONG = {  # what a slip in metrics.py would compute
    "aa": [(0.50 + 0.55 + 0.85 + 0.90) / 4],  # the diagonal
    "bwt": [
        ((0.60 - 0.80) + (0.70 - 0.58) + (0.40 - 0.85)) / 3,  # the best earlier score instead of R[i][i]
        ((0.60 - 0.70) + (0.70 - 0.58) + (0.40 - 0.85)) / 3,  # the previous stage instead of R[i][i]
        ((0.60 - 0.50) + (0.70 - 0.55) + (0.40 - 0.85)) / 4,  # the last task's zero term counted
    ],
    "fwt": [
        ((0.55 - 0.2) + (0.85 - 0.3) + (0.90 - 0.4)) / 3,  # R[i][i] instead of R[i-1][i]
        ((0.50 - 0.1) + (0.90 - 0.2) + (0.30 - 0.3) + (0.35 - 0.4)) / 4,  # task 0 counted
    ],
    "forgetting": [
        (0.20 + (0.90 - 0.70) + 0.45) / 3,  # stages before task i was learned counted (task 1: 0.9 at stage 0)
        (0.20 + 0.00 + 0.45) / 3,  # the last stage counted (clamps task 1's negative value at 0)
        ((0.50 - 0.60) + (0.55 - 0.70) + 0.45) / 3,  # only R[i][i] (that is -BWT)
    ],
}


def test_metrics_separate_the_variants():
    m = summarize(R4, ZERO_SHOT4)
    for key, value in RIGHT.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
        for wrong in WRONG[key]:  # the matrix does tell the variants apart
            assert abs(wrong - value) > 0.01, (key, wrong)
    assert m["forgetting"] == pytest.approx(0.53 / 3) and m["bwt"] == pytest.approx(-0.2 / 3)


def test_metrics_of_a_partial_sequence():
    """After 3 of 4 stages: task 3 is scored only as the next task (for FWT); the entries beyond are None."""
    rows = [r[:3] + [r[3] if t == 2 else None] for t, r in enumerate(R4[:3])]
    m = summarize(rows, ZERO_SHOT4)
    assert m["aa"] == pytest.approx((0.70 + 0.58 + 0.85) / 3)
    assert m["bwt"] == pytest.approx(((0.70 - 0.50) + (0.58 - 0.55)) / 2)
    assert m["fwt"] == pytest.approx(((0.90 - 0.2) + (0.30 - 0.3)) / 2)
    assert m["forgetting"] == pytest.approx(((0.80 - 0.70) + (0.55 - 0.58)) / 2)
