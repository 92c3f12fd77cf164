"""The gorp/ library alone (no Ray, no MLflow): three tasks in sequence on a small LLaMA-config model, three methods.

    python examples/gorp_only.py [--methods full,lora,gorp] [--steps 120]

Each task maps its own key tokens to shared value tokens by a random permutation; the task id is the first token.
A model that learns task 2 by overwriting what it learned for task 1 forgets it; the printed accuracy matrices and
BWT show how much each method forgets. It runs on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gorp.loop import run_task  # noqa: E402
from gorp.methods import build_method  # noqa: E402
from gorp.metrics import summarize  # noqa: E402

N_TASKS, KEYS, VOCAB = 3, 16, 128
HPARAMS = {
    "full": {"lr": 2e-3},
    "lora": {"lr": 5e-3, "lora_dropout": 0.0},
    "olora": {"lr": 5e-3, "lora_dropout": 0.0},
    "gorp": {"lr": 5e-3, "full_rank_lr": 2e-3, "lora_dropout": 0.0, "scale": 1.0, "update_gap": 10},
}


def task_data(task: int, seed: int = 0):
    g = torch.Generator().manual_seed(1000 * seed + task)
    values = 64 + torch.randperm(KEYS, generator=g)  # key k -> value 64 + perm[k]
    return values


def batches(task: int, steps: int, bs: int = 32, seed: int = 0):
    values = task_data(task, seed)

    def gen():
        g = torch.Generator().manual_seed(1000 * seed + 100 + task)
        for _ in range(steps):
            keys = torch.randint(0, KEYS, (bs,), generator=g)
            ids = torch.stack([torch.full((bs,), 100 + task), KEYS * task + keys, values[keys]], dim=1)  # (B, 3)
            labels = ids.clone()
            labels[:, :2] = -100  # loss on the answer only
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return gen


@torch.no_grad()
def accuracy(model, task: int, seed: int = 0) -> float:
    values = task_data(task, seed)
    keys = torch.arange(KEYS)
    ids = torch.stack([torch.full((KEYS,), 100 + task), KEYS * task + keys], dim=1)
    pred = model(input_ids=ids).logits[:, -1].argmax(-1)
    return float((pred == values).float().mean())


def small_llama(seed: int = 0):
    """A small randomly initialized LLaMA-config causal LM (2 blocks of width 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).float()


def run(name: str, steps: int, seed: int = 0, hparams: dict | None = None) -> dict:
    model = small_llama(seed)
    method = build_method(name, **(HPARAMS[name] if hparams is None else hparams))
    matrix = []
    for t in range(N_TASKS):
        model, _ = run_task(model, method, t, batches(t, steps, seed=seed))
        model.eval()
        matrix.append([accuracy(model, i, seed) if i <= t else None for i in range(N_TASKS)])
    return {"matrix": matrix, **summarize(matrix)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="full,lora,gorp")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title="after the last task")
    for col in ("method", "AA", "BWT", "forgetting"):
        summary.add_column(col, justify="right")
    for name in args.methods.split(","):
        with console.status(f"{name}: {N_TASKS} tasks x {args.steps} steps ..."):
            res = run(name, args.steps)
        t = Table(title=f"{name}: accuracy R[stage][task]")
        t.add_column("after stage")
        for i in range(N_TASKS):
            t.add_column(f"task {i}", justify="right")
        for s, row in enumerate(res["matrix"]):
            t.add_row(str(s), *("-" if v is None else f"{v:.2f}" for v in row))
        console.print(t)
        summary.add_row(name, f"{res['aa']:.3f}", f"{res['bwt']:+.3f}", f"{res['forgetting']:.3f}")
    console.print(summary)


if __name__ == "__main__":
    main()
