"""Continual-learning metrics over the accuracy matrix, and exact-match normalization.

``R[t][i]`` is the accuracy on task i after stage t (0-based here; T stages, T tasks, stage t learns task t), ``b[i]``
the zero-shot accuracy of the base model on task i. Entries for tasks not yet seen (i > t) may be None. Averages are per
task (each task weighs the same), not pooled over samples.

* AA         = mean_i R[T-1][i]
* BWT        = mean_{i < T-1} (R[T-1][i] - R[i][i])
* FWT        = mean_{i > 0}   (R[i-1][i] - b[i])     (needs R[i-1][i]: the score of task i before it is trained)
* forgetting = mean_{i < T-1} max_{t < T-1} (R[t][i] - R[T-1][i])   (t >= i: only stages that had seen task i)
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _check(r: Matrix) -> int:
    t = len(r)
    for row_i, row in enumerate(r):
        if len(row) < t:
            raise ValueError(f"accuracy matrix row {row_i} has {len(row)} entries, expected at least {t}")
        for i in range(row_i + 1):
            if row[i] is None:
                raise ValueError(f"accuracy matrix R[{row_i}][{i}] is missing: stage {row_i} must score task {i}")
    return t


def average_accuracy(r: Matrix) -> float | None:
    t = _check(r)
    return _mean([r[t - 1][i] for i in range(t)]) if t else None


def backward_transfer(r: Matrix) -> float | None:
    t = _check(r)
    return _mean([r[t - 1][i] - r[i][i] for i in range(t - 1)])


def forward_transfer(r: Matrix, zero_shot: Sequence[float | None]) -> float | None:
    t = _check(r)
    vals = [r[i - 1][i] - zero_shot[i] for i in range(1, t) if r[i - 1][i] is not None and zero_shot[i] is not None]
    return _mean(vals)


def forgetting(r: Matrix) -> float | None:
    t = _check(r)
    return _mean([max(r[s][i] - r[t - 1][i] for s in range(i, t - 1)) for i in range(t - 1)])


def summarize(r: Matrix, zero_shot: Sequence[float | None] | None = None) -> dict[str, float | None]:
    """AA, BWT, FWT (None without zero-shot scores) and forgetting of the stages so far."""
    return {
        "aa": average_accuracy(r),
        "bwt": backward_transfer(r),
        "fwt": forward_transfer(r, zero_shot) if zero_shot is not None else None,
        "forgetting": forgetting(r),
    }


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def exact_match(prediction: str, label: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(label)
