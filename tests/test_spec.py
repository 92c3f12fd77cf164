"""The stream spec: load_stream's errors name file and key; check_stream's name FILE:LINE. No Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from pipelines.records import DataError
from pipelines.spec import SpecError, Stream, check_stream, load_stream, parse_stream

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LABELS = ["no", "yes"]


def _record(i: int, output: str | None = None) -> dict:
    return {"instruction": "Is it a kind of animal?", "input": f"thing {i}", "output": output or LABELS[i % 2]}


def _jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Records as JSONL; raw_lines replaces line N (1-based) by the given bytes."""
    lines = [json.dumps(r).encode() for r in records]
    for n, raw in (raw_lines or {}).items():
        lines[n - 1] = raw
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _stream(tmp_path: Path, **task_overrides) -> dict:
    _jsonl(tmp_path / "a.train.jsonl", [_record(i) for i in range(6)])
    _jsonl(tmp_path / "a.test.jsonl", [_record(i) for i in range(4)])
    task = {"name": "a", "train": "a.train.jsonl", "test": "a.test.jsonl", "labels": LABELS} | task_overrides
    return {"name": "s", "model": "demo:smollm2-135m", "method": "gorp", "tasks": [task]}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(fn, *args, kind=SpecError) -> str:
    with pytest.raises(kind) as info:
        fn(*args)
    return str(info.value)


def test_valid_stream_resolves_paths_against_the_yaml_folder(tmp_path):
    stream = load_stream(_write(tmp_path, _stream(tmp_path)))
    assert stream.tasks[0].train == str(tmp_path / "a.train.jsonl")
    assert stream.training.grad_clip == 1.0 and stream.scaling.num_workers == 1
    assert stream.source == tmp_path / "stream.yaml"
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    local = parse_stream(_stream(tmp_path) | {"model": "models/tiny"}, base_dir=tmp_path)
    assert local.model == str(tmp_path / "models/tiny")  # an existing folder beside the YAML
    hub = parse_stream(_stream(tmp_path) | {"model": "HuggingFaceTB/SmolLM2-135M"}, base_dir=tmp_path)
    assert hub.model == "HuggingFaceTB/SmolLM2-135M"  # no such folder: a Hugging Face id (the local cache)
    remote = parse_stream(_stream(tmp_path) | {"model": "s3://bucket/models/tiny"}, base_dir=tmp_path)
    assert remote.model == "s3://bucket/models/tiny"
    uri_data = _stream(tmp_path)
    uri_data["tasks"][0] |= {"train": "s3://bucket/data/a.train.jsonl"}
    assert parse_stream(uri_data, base_dir=tmp_path).tasks[0].train == "s3://bucket/data/a.train.jsonl"


def test_unknown_key_is_named_with_its_path(tmp_path):
    data = _stream(tmp_path, lables=LABELS)
    msg = _error(load_stream, _write(tmp_path, data))
    assert "stream.yaml: tasks.0.lables: unknown key" in msg and "labels" in msg
    msg = _error(load_stream, _write(tmp_path, _stream(tmp_path) | {"scaling": {"num_worker": 2}}))
    assert "scaling.num_worker: unknown key (known: num_workers" in msg


def test_wrong_type_is_named(tmp_path):
    msg = _error(load_stream, _write(tmp_path, _stream(tmp_path) | {"training": {"epochs": "three"}}))
    assert "stream.yaml: training.epochs: Input should be a valid integer" in msg and "'three'" in msg
    msg = _error(load_stream, _write(tmp_path, _stream(tmp_path) | {"method": "gorpp"}))
    assert "stream.yaml: method: unknown method 'gorpp'; choose from gorp, full, lora" in msg


def test_bare_yes_no_labels_get_a_quoting_hint(tmp_path):
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(_stream(tmp_path)).replace("- 'no'", "- no").replace("- 'yes'", "- yes"))
    msg = _error(load_stream, path)
    assert "tasks.0.labels.0: Input should be a valid string (got False); YAML reads a bare" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "stream.yaml"
    path.write_text("name: s\ntasks: [\n  {name: a\n")
    assert _error(load_stream, path).startswith(f"{path}:")
    assert "invalid YAML" in _error(load_stream, path)


def test_duplicate_task_name(tmp_path):
    data = _stream(tmp_path)
    data["tasks"].append(dict(data["tasks"][0]))
    assert "tasks: duplicate task name 'a' (tasks 0 and 1)" in _error(load_stream, _write(tmp_path, data))


def test_semantic_checks(tmp_path):
    msg = _error(load_stream, _write(tmp_path, _stream(tmp_path, labels=None, metric="rank_classification")))
    assert "tasks.0.metric: rank_classification scores the label options" in msg
    assert "tasks.0.labels: duplicate label(s): ['no']" in _error(
        load_stream, _write(tmp_path, _stream(tmp_path, labels=["no", "no", "yes"]))
    )
    assert "tasks.0.train: unsupported data file" in _error(
        load_stream, _write(tmp_path, _stream(tmp_path, train="a.txt"))
    )
    assert "model: unknown demo model 'demo:gpt5'" in _error(
        load_stream, _write(tmp_path, _stream(tmp_path) | {"model": "demo:gpt5"})
    )


def test_missing_file_is_named_by_key(tmp_path):
    stream = load_stream(_write(tmp_path, _stream(tmp_path, test="missing.jsonl")))
    msg = _error(check_stream, stream)
    assert msg == f"{tmp_path / 'stream.yaml'}: tasks.0.test: file not found: {tmp_path / 'missing.jsonl'}"


def test_missing_model_folder(tmp_path):
    stream = load_stream(_write(tmp_path, _stream(tmp_path) | {"model": "no-such-model"}))
    assert "model: folder not found" in _error(check_stream, stream)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"instruction": "q", "input": "x", "output": "no"', "invalid JSON"),
        (b'{"instruction": "q", "input": "x", "output": "maybe"}', "label 'maybe' is not among the options"),
        (b'{"instruction": "q", "output": "no"}', "missing field 'input'"),
        (b'{"instruction": "q", "input": "x", "output": " "}', "empty output"),
        (b'{"instruction": "q", "input": 7, "output": "no"}', "field 'input' must be a string, got int"),
        (b'{"instruction": "q", "input": "caf\xe9", "output": "no"}', "invalid UTF-8 (byte 0xe9"),
        (b'["q", "x", "no"]', "expected an object"),
    ],
)
def test_bad_record_is_named_by_file_and_line(tmp_path, raw, reason):
    stream = load_stream(_write(tmp_path, _stream(tmp_path)))
    _jsonl(tmp_path / "a.train.jsonl", [_record(i) for i in range(6)], {4: raw})
    msg = _error(check_stream, stream, kind=DataError)
    assert msg.startswith(f"{tmp_path / 'a.train.jsonl'}:4: {reason}"), msg


def test_empty_file(tmp_path):
    stream = load_stream(_write(tmp_path, _stream(tmp_path)))
    (tmp_path / "a.test.jsonl").write_bytes(b"")
    assert _error(check_stream, stream, kind=DataError) == f"{tmp_path / 'a.test.jsonl'}: empty file (no records)"
    (tmp_path / "a.test.jsonl").write_text("\n\n")
    assert "empty file" in _error(check_stream, stream, kind=DataError)


def test_column_mapping(tmp_path):
    records = [{"question": "Is it?", "answer": LABELS[i % 2]} for i in range(4)]
    _jsonl(tmp_path / "m.jsonl", records)
    data = _stream(
        tmp_path,
        train="m.jsonl",
        test="m.jsonl",
        columns={"instruction": "question", "input": None, "output": "answer"},
    )
    plan = check_stream(load_stream(_write(tmp_path, data)))
    assert plan.tasks[0].counts == {"train": 4, "test": 4}
    data["tasks"][0]["columns"]["output"] = "label"
    msg = _error(check_stream, load_stream(_write(tmp_path, data)), kind=DataError)
    assert msg.startswith(f"{tmp_path / 'm.jsonl'}:1: missing field 'label' (the output)")


def test_skip_mode_counts_and_plan_prints(tmp_path):
    stream = load_stream(_write(tmp_path, _stream(tmp_path, on_bad_record="skip")))
    _jsonl(tmp_path / "a.train.jsonl", [_record(i) for i in range(6)], {2: b"{oops", 5: b'{"output": "no"}'})
    plan = check_stream(stream)
    assert plan.tasks[0].counts == {"train": 4, "test": 4} and plan.tasks[0].num_bad == 2
    assert plan.tasks[0].label_counts == {"no": 2, "yes": 2}
    console = Console(record=True, width=140)
    console.print(plan)
    text = console.export_text()
    assert "a" in text and "2: no, yes" in text and "train" in text


def test_token_estimate_with_a_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from helpers_tokenizer import make_tokenizer

    stream = load_stream(_write(tmp_path, _stream(tmp_path, max_source_tokens=12)))
    corpus = [json.dumps(_record(i)) for i in range(6)] + ["Input Answer Options :"]
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", corpus))
    tp = check_stream(stream, tok).tasks[0]
    # "Is it a kind of animal ?" (7) + "Options : no , yes" (5) + "Input : thing N" (4) + "Answer :" (2) = 18 words
    assert tp.prompt_tokens == (18.0, 18) and tp.num_over == 6


@pytest.mark.parametrize("name", ["quickstart.yaml", "wordnet6.yaml"])
def test_examples_load_and_check(name):
    stream = load_stream(EXAMPLES / name)
    assert isinstance(stream, Stream) and stream.model == "demo:smollm2-135m" and stream.method == "gorp"
    assert len(stream.tasks) == (3 if name == "quickstart.yaml" else 6)
    plan = check_stream(stream)
    assert all(t.num_bad == 0 and t.counts["train"] >= 360 for t in plan.tasks)
    assert "/shared" not in (EXAMPLES / name).read_text()
    assert (EXAMPLES / "data/wordnet/LICENSE-WordNet.txt").is_file()
