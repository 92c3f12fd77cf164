"""What a search scores trials on: the validation split (pipelines.data.load_eval_set(split=...)), and the held-out
slice of training data for a task that has none (tuning.holdout)."""

from __future__ import annotations

import json

import pytest

from pipelines.data import load_eval_set
from pipelines.spec import Task


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task(tmp_path, validation=True):
    rows = {
        split: [{"instruction": f"{split} question {i}", "input": "", "output": answer} for i in range(3)]
        for split, answer in (("train", "a"), ("validation", "b"), ("test", "a"))
    }
    files = {s: _write(tmp_path / f"t.{s}.jsonl", r) for s, r in rows.items()}
    if not validation:
        files.pop("validation")
    return Task.model_validate({"name": "t", **files, "labels": ["a", "b"]})


def test_eval_set_reads_the_split_asked_for(tmp_path):
    task = _task(tmp_path)
    val = load_eval_set(task, tmp_path / "q", "validation")
    test = load_eval_set(task, tmp_path / "q")
    assert val["answers"] == ["b", "b", "b"] and all(p.startswith("validation question") for p in val["prompts"])
    assert test["answers"] == ["a", "a", "a"] and all(p.startswith("test question") for p in test["prompts"])


def test_eval_on_a_missing_validation_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no 'validation' split"):
        load_eval_set(_task(tmp_path, validation=False), tmp_path / "q", "validation")
