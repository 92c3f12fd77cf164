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


def test_held_out_rows_are_seeded_disjoint_and_never_trained_on(tmp_path):
    from tuning.holdout import held_out_indices, validation_stream

    stream_yaml = tmp_path / "s.yaml"
    rows = [{"instruction": f"q{i}", "input": "", "output": "a" if i % 2 else "b"} for i in range(20)]
    _write(tmp_path / "t.train.jsonl", rows)
    _write(tmp_path / "t.test.jsonl", rows[:3])
    _write(tmp_path / "v.train.jsonl", rows)
    _write(tmp_path / "v.validation.jsonl", rows[:2])
    _write(tmp_path / "v.test.jsonl", rows[:3])
    (tmp_path / "model").mkdir()
    tasks = [
        {"name": "t", "train": "t.train.jsonl", "test": "t.test.jsonl", "labels": ["a", "b"]},
        {"name": "v", "train": "v.train.jsonl", "validation": "v.validation.jsonl", "test": "v.test.jsonl"},
    ]
    import yaml

    from pipelines.spec import load_stream

    stream_yaml.write_text(yaml.safe_dump({"name": "s", "model": "model", "method": "lora", "tasks": tasks}))
    stream, notes = validation_stream(load_stream(stream_yaml), tmp_path / "out", 0.25, seed=3)
    held = held_out_indices(20, 0.25, 3, "t")
    assert len(held) == 5 and held == held_out_indices(20, 0.25, 3, "t") != held_out_indices(20, 0.25, 4, "t")
    read = [json.loads(line) for line in open(stream.tasks[0].validation)]
    train = [json.loads(line) for line in open(stream.tasks[0].train)]
    assert [r["instruction"] for r in read] == [f"q{i}" for i in sorted(held)]
    assert [r["instruction"] for r in train] == [f"q{i}" for i in range(20) if i not in held]
    assert stream.tasks[0].test == str(tmp_path / "t.test.jsonl")  # test untouched (only `gorp run` scores it)
    assert stream.tasks[1].train == str(tmp_path / "v.train.jsonl")  # a task with a validation split keeps its data
    assert stream.tasks[1].validation == str(tmp_path / "v.validation.jsonl")
    assert "5 of 20 training rows held out" in notes[0] and "validation split" in notes[1]
