"""The gorp/ library alone (no Ray, no MLflow): three tasks in sequence on a small LLaMA-config model.

    python examples/gorp_only.py [--methods full,lora,gorp-paper,gorp] [--steps 120] [--seeds 0,1,2]

Each task maps 16 key tokens of its own to the same 16 value tokens by a permutation of its own (the task id is the
first token): new inputs, shared outputs, the setting GORP's task memory is meant for. Tasks are numbered from 0 as in
the tables. Task 1 can be learned without changing what the model does on task 0's inputs; a method that overwrites
that forgets task 0.

What it prints (accuracy matrices; AA, BWT and memory size, mean over the seeds), and why:
- ``lora``: one rank-32 adapter on attention q/v, continued task after task: forgets about half of the earlier tasks.
- ``gorp-paper``: GORP as the paper sets it up (a fresh Kaiming-initialized adapter per task, memory at 90% energy)
  forgets as much here. Its memory keeps, per matrix and task, the leading directions of LoRA A's final first moment:
  2-5 of 64 input directions for task 0, covering 13-63% of task 0's input energy, and the next task's product B A,
  whose random A is not kept off the memory, writes into them too (benchmarks/gorp_toy_diagnosis.py).
- ``gorp``: the same method with room in its memory (``memory_threshold`` 0.99: 6-9 directions, 37-78% of the input
  energy) and ``adapter_init="orthogonal"`` (each new A starts off the stored basis, so B A leaves those directions
  alone): it forgets about half as much as LoRA and still learns every task. The memory column is how many of the 64
  input directions each adapter matrix has given to the three tasks: the room a longer stream would run out of.
- ``full`` trains every weight, each task's own key embeddings included, and forgets least on this toy (with the
  embeddings frozen its BWT is about -0.47).

Measured, 3 seeds: AA / BWT full 0.89 / -0.17, lora 0.63 / -0.55, gorp-paper 0.60 / -0.60, gorp 0.81 / -0.28
(benchmarks/results/gorp_toy_settings.txt has more settings). The run takes 72 s of CPU time on one thread; on the
shared 2-core development machine under a load of 11-15 from other jobs it took 4 min 53 s of wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gorp.loop import run_task  # noqa: E402
from gorp.methods import build_method  # noqa: E402
from gorp.metrics import summarize  # noqa: E402

N_TASKS, KEYS, VOCAB = 3, 16, 128
LORA = {"lr": 5e-3, "lora_dropout": 0.0, "lora_r": 32, "lora_alpha": 128.0}
GORP = {**LORA, "full_rank_lr": 2e-3, "scale": 1.0, "update_gap": 10, "adapter_init": "kaiming"}
CONFIGS = {  # name: (method, hyperparameters)
    "full": ("full", {"lr": 2e-3}),
    "lora": ("lora", LORA),
    "gorp-paper": ("gorp", GORP),
    "gorp": ("gorp", {**GORP, "memory_threshold": 0.99, "adapter_init": "orthogonal"}),
}


def task_data(task: int, seed: int = 0):
    g = torch.Generator().manual_seed(1000 * seed + task)
    return 64 + torch.randperm(KEYS, generator=g)  # key k -> value token 64 + perm[k]


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


def run(name: str, steps: int, seed: int, hparams: dict) -> dict:
    """Train the three tasks in sequence with method ``name``; the accuracy matrix, its summary and the memory size."""
    model = small_llama(seed)
    method = build_method(name, **hparams)
    matrix = []
    for t in range(N_TASKS):
        model, _ = run_task(model, method, t, batches(t, steps, seed=seed))
        model.eval()
        matrix.append([accuracy(model, i, seed) if i <= t else None for i in range(N_TASKS)])
    dims = [k for n, k in method.memory.dims().items() if "lora_A" in n] if name == "gorp" else []
    return {"matrix": matrix, "memory": statistics.mean(dims) if dims else None, **summarize(matrix)}


def mean_sd(xs: list[float], sign: str = "") -> str:
    return f"{statistics.mean(xs):{sign}.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(CONFIGS), help=f"some of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console, seeds = Console(), [int(s) for s in args.seeds.split(",")]
    summary = Table(title=f"after the last task, mean ± sd over seeds {seeds}")
    for col in ("method", "AA", "BWT", "learned R[i][i]", "memory (of 64)"):
        summary.add_column(escape(col), justify="right")
    for name in args.methods.split(","):
        method, hparams = CONFIGS[name]
        with console.status(f"{name}: {N_TASKS} tasks x {args.steps} steps x {len(seeds)} seeds ..."):
            res = [run(method, args.steps, s, hparams) for s in seeds]
        t = Table(title=escape(f"{name}: accuracy R[stage][task]"))
        t.add_column("after stage")
        for i in range(N_TASKS):
            t.add_column(f"task {i}", justify="right")
        for s in range(N_TASKS):
            t.add_row(str(s), *(f"{statistics.mean(r['matrix'][s][i] for r in res):.2f}" for i in range(s + 1)))
        console.print(t)
        learned = [statistics.mean(r["matrix"][i][i] for i in range(N_TASKS)) for r in res]
        memory = "-" if res[0]["memory"] is None else f"{statistics.mean(r['memory'] for r in res):.1f}"
        summary.add_row(
            name, mean_sd([r["aa"] for r in res]), mean_sd([r["bwt"] for r in res], "+"), mean_sd(learned), memory
        )
    console.print(summary)


if __name__ == "__main__":
    main()
