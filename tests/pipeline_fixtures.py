"""A tiny offline stream for pipeline tests: a word-level tokenizer, a tiny LLaMA saved as a model folder, and short
slices of three WordNet tasks from examples/data (real records, few of them)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from helpers_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "wordnet"
TASKS = {
    "part_of_speech": ["adjective", "adverb", "noun", "verb"],
    "hypernym": ["no", "yes"],
    "domain": ["baseball", "chemistry", "computer science", "law", "mathematics", "military", "music", "physics"],
}


def _slice(src: Path, dst: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_model(folder: Path, corpus: list[str]) -> Path:
    """A tiny LLaMA with a word-level tokenizer over ``corpus``, saved like any Hugging Face model folder."""
    from transformers import AutoTokenizer

    from gorp.models import tiny_llama

    make_tokenizer(folder, corpus)
    tok = AutoTokenizer.from_pretrained(folder)
    model = tiny_llama(seed=0, vocab_size=len(tok), hidden=32, layers=2, heads=4, intermediate=64)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_stream(
    root: Path,
    *,
    n_train: int = 32,
    n_test: int = 12,
    method: str = "gorp",
    num_workers: int = 2,
    fsdp: bool = True,
    max_steps: int = 4,
    batch_size: int = 8,
    **overrides,
) -> Path:
    """Write data, a model folder and stream.yaml under ``root``; returns the YAML path."""
    root.mkdir(parents=True, exist_ok=True)
    corpus, tasks = [], []
    for name, labels in TASKS.items():
        rows = _slice(DATA / f"{name}.train.jsonl", root / f"{name}.train.jsonl", n_train)
        rows += _slice(DATA / f"{name}.test.jsonl", root / f"{name}.test.jsonl", n_test)
        corpus += [f"{r['instruction']} {r['input']} {r['output']} Options Answer Input Instruction" for r in rows]
        tasks.append(
            {
                "name": name,
                "train": f"{name}.train.jsonl",
                "test": f"{name}.test.jsonl",
                "labels": labels,
                "max_source_tokens": 64,
                "max_target_tokens": 6,
            }
        )
    make_model(root / "model", corpus)
    spec = {
        "name": "tiny-stream",
        "model": "model",
        "method": method,
        "method_args": {"lora_dropout": 0.0} if method in ("gorp", "lora", "olora") else {},
        "tasks": tasks,
        "training": {"batch_size": batch_size, "max_steps": max_steps, "eval_batch_size": 8, "seed": 0},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": 1, "fsdp": fsdp},
        "run_dir": str(root / "run"),
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "stream.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
