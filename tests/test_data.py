"""Ray Data preprocessing: validation, the prompt template, the label mask, the Parquet cache, equal steps per rank."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoTokenizer

import pipelines.data as data
from helpers_tokenizer import make_tokenizer
from pipelines.data import prepare_splits
from pipelines.encoding import Encoder, tokenizer_identity
from pipelines.feeding import IGNORE_INDEX, MODEL_COLUMNS, PadCollate
from pipelines.records import DataError, file_digest, format_prompt, scan_records, validate_file
from pipelines.spec import Task

LABELS = ["no", "yes"]
INSTRUCTION = "Is the first word a kind of the second?"


def prepare_split(task, **kwargs):
    return prepare_splits([(task, "train")], **kwargs)[0]


def iter_parquet_batches(path, *, batch_size: int, pad_token_id: int, seed: int | None = None):
    """The cached rows as padded batches without Ray, shuffled by ``seed`` (None: file order)."""
    table = pq.read_table(str(path), columns=list(MODEL_COLUMNS))
    order = np.random.default_rng(seed).permutation(table.num_rows) if seed is not None else np.arange(table.num_rows)
    collate = PadCollate(pad_token_id)
    for start in range(0, table.num_rows - table.num_rows % batch_size, batch_size):
        yield collate(table.take(order[start : start + batch_size]))


def _records(n: int) -> list[dict]:
    return [{"instruction": INSTRUCTION, "input": f"word{i} thing{i % 3}", "output": LABELS[i % 2]} for i in range(n)]


def _jsonl(path: Path, records: list, bad: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r).encode() for r in records]
    for n, raw in (bad or {}).items():
        lines.insert(n - 1, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    corpus = [format_prompt(r["instruction"], r["input"], LABELS) + " " + r["output"] for r in _records(12)]
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "causal", corpus + ["Options : ,"])


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


# ---------------------------------------------------------------- template and encoding (no Ray)


def test_format_prompt():
    assert format_prompt("Pick one.", "a cat", ["no", "yes"]) == "Pick one.\nOptions: no, yes\nInput: a cat\nAnswer:"
    assert format_prompt("Choose from the options: no, yes.", "", ["no", "yes"]) == (
        "Choose from the options: no, yes.\nAnswer:"  # options already listed, input empty: neither repeated
    )
    assert format_prompt("Pick one.") == "Pick one.\nAnswer:"


def test_label_mask_is_exactly_the_prompt(tok):
    enc = Encoder(tok, max_source_tokens=64, max_target_tokens=4)
    prompts = [format_prompt(INSTRUCTION, "word1 thing1", LABELS), format_prompt(INSTRUCTION, "word2", LABELS)]
    ex = enc.examples(prompts, ["yes", "no"])
    for prompt, answer, ids, labels in zip(prompts, ["yes", "no"], ex["input_ids"], ex["labels"], strict=True):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt_ids + answer_ids and len(labels) == len(ids)
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert labels[len(prompt_ids) :] == answer_ids and IGNORE_INDEX not in answer_ids
    assert ex["truncated"] == [False, False]


def test_truncation_cuts_the_prompt_from_the_left_never_the_answer(tmp_path, tok):
    enc = Encoder(tok, max_source_tokens=5, max_target_tokens=4)
    prompt = format_prompt(INSTRUCTION, "word1 thing1", LABELS)
    ex = enc.examples([prompt], ["yes"])
    full = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][0][:5] == full[-5:] and tok.decode(full[-2:]) == "Answer :"
    assert ex["truncated"] == [True] and ex["n_prompt_tokens"] == [len(full)]
    assert ex["labels"][0] == [IGNORE_INDEX] * 5 + tok(" yes", add_special_tokens=False)["input_ids"] + [3]
    with pytest.raises(ValueError, match="over max_target_tokens=1; raise max_target_tokens"):
        Encoder(tok, max_source_tokens=5, max_target_tokens=1).examples([prompt], ["yes"])
    # a BOS-adding tokenizer keeps its BOS in front of the truncated prompt
    bos_tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "bos", [prompt, "yes"], add_bos=True))
    ids = Encoder(bos_tok, max_source_tokens=5, max_target_tokens=4).examples([prompt], ["yes"])["input_ids"][0]
    assert ids[0] == bos_tok.bos_token_id and ids[1:5] == bos_tok(prompt, add_special_tokens=False)["input_ids"][-4:]


def test_seq2seq_labels_are_the_answer(tmp_path):
    t5 = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "t5", [INSTRUCTION, "Answer : yes no"], add_eos=True))
    ex = Encoder(t5, max_source_tokens=4, max_target_tokens=4, seq2seq=True).examples(
        [INSTRUCTION + "\nAnswer:"], ["yes"]
    )
    assert ex["input_ids"][0] == t5("of the second ? Answer :", add_special_tokens=False)["input_ids"][-3:] + [3]
    assert ex["labels"][0] == t5("yes", add_special_tokens=False)["input_ids"] + [t5.eos_token_id]


def test_pad_collate_pads_each_batch_to_its_longest_row():
    table = pa.table(
        {
            "input_ids": pa.array([[5, 6, 7], [8], [9, 9]], pa.list_(pa.int32())),
            "labels": pa.array([[-100, 6, 7], [8], [-100, 9]], pa.list_(pa.int32())),
        }
    ).slice(1, 2)
    out = PadCollate(pad_token_id=0, pad_to_multiple_of=1)(table)
    assert out["input_ids"].tolist() == [[8, 0], [9, 9]] and out["input_ids"].dtype == torch.int64
    assert out["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert out["labels"].tolist() == [[8, -100], [-100, 9]]
    assert PadCollate(0)(table)["input_ids"].shape == (2, 8)  # rounded up to a multiple of 8


# ---------------------------------------------------------------- validation


def test_skip_mode_quarantines_with_file_line_reason_and_raw(tmp_path):
    src = _jsonl(
        tmp_path / "t.jsonl",
        _records(5),
        {2: b'{"output": "yes"', 4: b'{"instruction": "q", "input": "x", "output": "maybe"}'},
    )
    with pytest.raises(DataError, match=r"t\.jsonl:2: invalid JSON"):
        validate_file(src, labels=LABELS)
    report = validate_file(src, labels=LABELS, on_bad_record="skip", quarantine=tmp_path / "q" / "bad.jsonl")
    assert (report.num_records, report.num_bad) == (5, 2)
    bad = [json.loads(line) for line in (tmp_path / "q" / "bad.jsonl").read_text().splitlines()]
    assert [(b["line"], b["file"]) for b in bad] == [(2, str(src)), (4, str(src))]
    assert bad[0]["raw"] == '{"output": "yes"' and "not among the options" in bad[1]["reason"]
    with pytest.raises(ValueError, match="needs a quarantine file"):
        validate_file(src, on_bad_record="skip")


def test_record_size_limit_and_null(tmp_path):
    big = {"instruction": "q" * 500, "input": None, "output": "no"}
    src = _jsonl(tmp_path / "t.jsonl", _records(2) + [big])
    bad = [r for r in scan_records(src, max_record_bytes=200) if not isinstance(r, dict)]
    assert [str(b) for b in bad] == [f"{src}:3: record of {len(json.dumps(big))} bytes is over the limit of 200"]
    assert str(next(r for r in scan_records(src) if not isinstance(r, dict))).endswith("got null")


def test_csv_parquet_and_json_arrays(tmp_path):
    rows = [{"q": "Is it?", "label": "1"}, {"q": "multi\nline", "label": "2"}, {"q": "", "label": ""}]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["q", "label"])
        w.writeheader()
        w.writerows(rows)
    cols = {"instruction": "q", "input": None, "output": "label"}
    out = list(scan_records(tmp_path / "t.csv", cols, ["1", "2"]))
    assert out[:2] == [
        {"instruction": "Is it?", "input": "", "output": "1"},
        {"instruction": "multi\nline", "input": "", "output": "2"},
    ]
    assert str(out[2]) == f"{tmp_path / 't.csv'}:5: empty output (field 'label')"  # line 5: row 2 spans 3-4
    with pytest.raises(DataError, match=r"t\.csv:1: missing column\(s\) \['input'\] in the header \['q', 'label'\]"):
        list(scan_records(tmp_path / "t.csv", {"instruction": "q", "output": "label"}))
    pq.write_table(pa.table({"q": ["a", None], "label": ["1", "2"]}), tmp_path / "t.parquet")
    assert str(list(scan_records(tmp_path / "t.parquet", cols))[1]).startswith(f"{tmp_path / 't.parquet'}: row 2:")
    pq.write_table(pa.table({"q": ["a"], "label": [1]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="column 'label' has type int64, expected string"):
        list(scan_records(tmp_path / "n.parquet", cols))
    (tmp_path / "t.json").write_text(json.dumps(_records(2) + [{"output": "no"}]))
    assert "row 3: missing field 'instruction'" in str(list(scan_records(tmp_path / "t.json"))[2])


def test_digests(tmp_path, tok_dir, tok):
    src = _jsonl(tmp_path / "t.jsonl", _records(3))
    assert file_digest(src) == hashlib.sha256(src.read_bytes()).hexdigest()
    other = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "other", ["different words"]))
    assert tokenizer_identity(tok) == tokenizer_identity(AutoTokenizer.from_pretrained(tok_dir))
    assert tokenizer_identity(tok)["hash"] != tokenizer_identity(other)["hash"]


# ---------------------------------------------------------------- Ray: tokenize, cache, feed


def test_round_trip_and_cache_hit(ray_local, tmp_path, tok_dir, tok, monkeypatch):
    records = _records(20)
    task = Task(
        name="t",
        train=_jsonl(tmp_path / "t.jsonl", records),
        test=tmp_path / "t.jsonl",
        labels=LABELS,
        max_source_tokens=64,
        max_target_tokens=4,
    )
    first = prepare_split(task, tokenizer_path=tok_dir, cache_dir=tmp_path / "cache")
    assert not first.cache_hit and (first.num_rows, first.num_bad, first.num_truncated) == (20, 0, 0)
    table = pq.read_table(first.path)
    for rec, ids, labels in zip(records, table["input_ids"].to_pylist(), table["labels"].to_pylist(), strict=True):
        prompt = tok(format_prompt(rec["instruction"], rec["input"], LABELS), add_special_tokens=False)["input_ids"]
        answer = tok(" " + rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt + answer and labels == [IGNORE_INDEX] * len(prompt) + answer  # file order kept
    assert first.dataset().count() == 20 and first.dataset().columns() == ["input_ids", "labels"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(data, "_tokenize", no_tokenizing)
    again = prepare_split(task, tokenizer_path=tok_dir, cache_dir=tmp_path / "cache")
    assert again.cache_hit and again.path == first.path and again.num_rows == 20
    changed = task.model_copy(update={"max_source_tokens": 32})  # another key: would tokenize again
    with pytest.raises(AssertionError, match="must not tokenize"):
        prepare_split(changed, tokenizer_path=tok_dir, cache_dir=tmp_path / "cache")

    batches = list(iter_parquet_batches(first.path, batch_size=8, pad_token_id=first.pad_token_id, seed=0))
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 8
    assert (
        batches[0]["labels"].tolist()
        != list(iter_parquet_batches(first.path, batch_size=8, pad_token_id=0))[0]["labels"].tolist()
    )  # shuffled
    mask = batches[0]["attention_mask"].bool()
    assert (batches[0]["labels"][~mask] == IGNORE_INDEX).all()


def test_training_order_is_a_seeded_permutation_per_epoch(ray_local):
    """``training.shuffle``: every epoch visits each row once, in a permutation that (seed, stage, epoch) alone decides
    (so every rank and a resumed worker see the same batches); another seed or stage reorders; off: the file's order."""
    from pipelines.worker import global_batches

    rows = 24
    table = pa.table({"input_ids": [[i + 1] for i in range(rows)], "labels": [[i] for i in range(rows)]})
    ds = ray.data.from_arrow(table)

    def order(shuffle, steps=12):  # 2 epochs of 6 batches of 4
        return [r for b in global_batches(ds.iterator(), 4, steps, 0, shuffle) for r in b["labels"][:, 0].tolist()]

    first = order((3, 1, rows))
    assert sorted(first[:rows]) == sorted(first[rows:]) == list(range(rows))  # each epoch is a permutation
    assert first[:rows] != first[rows:] and first[:rows] != list(range(rows))  # a new one each epoch
    assert order((3, 1, rows)) == first  # a function of (seed, stage, epoch) only
    assert order((3, 1, rows), steps=3) == first[:12]  # a resumed stage skips into the same sequence
    assert order((4, 1, rows)) != first and order((3, 2, rows)) != first
    assert order(None) == list(range(rows)) * 2


def test_several_splits_tokenize_in_one_job_each_with_its_own_limits(ray_local, tmp_path, tok_dir, tok, monkeypatch):
    """Three splits with other labels, limits and a skipped bad line: one Ray Data job (small files share a batch),
    and every split's rows equal an Encoder run on that file alone, in file order."""
    a = Task(name="a", train=_jsonl(tmp_path / "a.jsonl", _records(20)), test=tmp_path / "a.jsonl", labels=LABELS)
    b_recs = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ["yes", "no", "maybe"] * 4]
    b = Task(
        name="b",
        train=_jsonl(tmp_path / "b.jsonl", b_recs, {5: b"{broken"}),
        test=tmp_path / "b.jsonl",
        max_source_tokens=4,  # truncates: only b's prompts
        max_target_tokens=3,
        on_bad_record="skip",
    )
    c = a.model_copy(update={"name": "c", "labels": ["yes", "no"]})  # same file, other options: other prompts
    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    kw = {"tokenizer_path": tok_dir, "cache_dir": tmp_path / "cache", "quarantine_dir": tmp_path / "q"}
    got = data.prepare_splits([(a, "train"), (b, "train"), (c, "train")], **kw)
    assert len(calls) == 1 and [p.cache_hit for p in got] == [False, False, False]
    assert [(p.task, p.num_rows, p.num_bad) for p in got] == [("a", 20, 0), ("b", 12, 1), ("c", 20, 0)]
    for task, recs, prep in ((a, _records(20), got[0]), (b, b_recs, got[1]), (c, _records(20), got[2])):
        enc = Encoder(tok, max_source_tokens=task.max_source_tokens, max_target_tokens=task.max_target_tokens)
        want = enc.examples(
            [format_prompt(r["instruction"], r["input"], task.labels) for r in recs], [r["output"] for r in recs]
        )
        table = pq.read_table(prep.path)
        assert table["input_ids"].to_pylist() == want["input_ids"]
        assert table["labels"].to_pylist() == want["labels"]
        assert prep.num_truncated == sum(want["truncated"])
    assert got[1].num_truncated > 0 and got[0].num_truncated == 0
    again = data.prepare_splits([(a, "train"), (b, "train"), (c, "train")], **kw)
    assert len(calls) == 1 and all(p.cache_hit for p in again)
    assert [p.path for p in again] == [p.path for p in got]
    ds = got[1].dataset()
    assert ds.count() == 12 and ds.columns() == ["input_ids", "labels"]


def test_skip_mode_through_ray_quarantines_and_reads_the_good_records(ray_local, tmp_path, tok_dir):
    src = _jsonl(tmp_path / "t.jsonl", _records(10), {3: b"\xff\xfe not utf-8", 7: b'{"instruction": "q", "inpu'})
    task = Task(name="t", train=src, test=src, labels=LABELS, on_bad_record="skip")
    prep = prepare_split(task, tokenizer_path=tok_dir, cache_dir=tmp_path / "c", quarantine_dir=tmp_path / "quarantine")
    assert (prep.num_rows, prep.num_bad) == (10, 2) and prep.quarantine == tmp_path / "quarantine" / "t.train.jsonl"
    bad = [json.loads(line) for line in prep.quarantine.read_text().splitlines()]
    assert [b["line"] for b in bad] == [3, 7] and "invalid UTF-8" in bad[0]["reason"]
    strict = task.model_copy(update={"on_bad_record": "error"})
    with pytest.raises(DataError, match=r"t\.jsonl:3: invalid UTF-8"):
        prepare_split(strict, tokenizer_path=tok_dir, cache_dir=tmp_path / "c")
    short = task.model_copy(update={"max_target_tokens": 1})  # the check runs in a Ray actor; the error comes back
    with pytest.raises(DataError, match=r"t\.jsonl: answer '(no|yes)' is 2 tokens with EOS, over max_target_tokens=1"):
        prepare_split(short, tokenizer_path=tok_dir, cache_dir=tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == [prep.path.parent.name]  # no half-written entry left
