"""A tiny offline stream for pipeline tests: a word-level tokenizer, a tiny LLaMA saved as a model folder, and three
synthetic tasks that the tiny model learns within a dozen steps.

Each task asks for one fixed answer among its options ("Name the first color." -> red). Learning a task is learning
its answer, so accuracy right after a stage is high (1.0 with the shipped settings) where the base model scores 0, and
the second task ("Name the second color." -> blue, the same options) overwrites the first one's answer unless the
method protects it: forgetting is visible. Inputs vary (random words), so no two records are the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import yaml

from helpers_tokenizer import make_tokenizer

TASKS = {  # name -> (instruction, options, the answer)
    "first": ("Name the first color.", ["red", "blue"], "red"),
    "second": ("Name the second color.", ["red", "blue"], "blue"),
    "animal": ("Name the animal.", ["cat", "dog"], "dog"),
    "bird": ("Name the bird.", ["owl", "hen"], "owl"),  # a task to append to a sequence
}
NAMES = ["first", "second", "animal"]  # the stream's tasks unless told otherwise
WORDS = "apple sky grass coal snow sun sea leaf rock tree moon star bird fish road lake".split()
# settings under which every method learns each task in 12 steps of 8 examples (see the module docstring)
METHOD_ARGS = {
    "gorp": {"lora_dropout": 0.0, "lr": 0.05, "full_rank_lr": 0.02},
    "lora": {"lora_dropout": 0.0, "lr": 0.05},
    "olora": {"lora_dropout": 0.0, "lr": 0.05},
    "full": {"lr": 0.003},
}


def task_rows(name: str, n: int, seed: int) -> list[dict]:
    instruction, _, answer = TASKS[name]
    rng = random.Random(f"{name}-{seed}")
    return [{"instruction": instruction, "input": " ".join(rng.sample(WORDS, 2)), "output": answer} for _ in range(n)]


def write_task(root: Path, name: str, n_train: int, n_test: int) -> dict:
    """The task's train/test JSONL under ``root`` and its stream entry."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        (root / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows(name, n, seed)))
    return {
        "name": name,
        "train": f"{name}.train.jsonl",
        "test": f"{name}.test.jsonl",
        "labels": TASKS[name][1],
        "max_source_tokens": 64,
        "max_target_tokens": 6,
    }


def make_model(folder: Path, corpus: list[str]) -> Path:
    """A tiny LLaMA with a word-level tokenizer over ``corpus``, saved like any Hugging Face model folder."""
    from transformers import AutoTokenizer

    from tiny_models import tiny_llama

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
    max_steps: int = 12,
    batch_size: int = 8,
    tasks: list[str] = NAMES,
    **overrides,
) -> Path:
    """Write data, a model folder and stream.yaml under ``root``; returns the YAML path."""
    root.mkdir(parents=True, exist_ok=True)
    entries = [write_task(root, name, n_train, n_test) for name in tasks]
    corpus = [f"{i} {' '.join(o)} {' '.join(WORDS)} Options Answer Input : , ." for i, o, _ in TASKS.values()]
    if not (root / "model" / "config.json").exists():
        make_model(root / "model", corpus)
    spec = {
        "name": "tiny-stream",
        "model": "model",
        "method": method,
        "method_args": METHOD_ARGS.get(method, {}),
        "tasks": entries,
        "training": {"batch_size": batch_size, "max_steps": max_steps, "eval_batch_size": 8, "seed": 0},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": 1, "fsdp": fsdp},
        "run_dir": str(root / "run"),
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "stream.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class SlowSteps:
    """Worker hooks for the recovery tests: every optimizer step takes ``seconds`` longer; ``nan_at=(task, step)``
    turns that step's loss (0-based step) into NaN, as if the batch had blown up."""

    def __init__(self, seconds: float = 0.0, nan_at: tuple[str, int] | None = None):
        self.seconds, self.nan_at = seconds, nan_at

    def after_build(self, stage, model, method):
        return model, method

    def after_step(self, stage, task, step, loss):
        import time

        time.sleep(self.seconds)
        return float("nan") if self.nan_at == (task, step) else loss


@contextlib.contextmanager
def s3_server(bucket: str, *, set_environ: bool = False):
    """An S3 API (moto) on 127.0.0.1 holding an empty ``bucket``; yields the environment that points pyarrow (hence
    Ray Data and Ray Train), boto3 and MLflow's artifact client at it. ``set_environ``: also this process's, for the
    duration (Ray workers started meanwhile inherit it)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        if set_environ:
            os.environ.update(env)
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        if set_environ:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()
