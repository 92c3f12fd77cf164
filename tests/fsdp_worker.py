"""Runs a two-task continual sequence, sharded with FSDP2 over gloo or in one process; always in a process of its own
(spawned by test_fsdp.py), since it sets process-wide state: one torch thread, deterministic algorithms, the seed."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from gorp.fsdp import full_state_dict, shard_model
from gorp.loop import train_step
from gorp.methods import build_method
from tiny_models import tiny_llama

STEPS = 16  # per task; with update_gap 5: refreshes at steps 0, 5, 10, 15 of each task
BATCH, SEQ, VOCAB = 4, 12, 128


def batch(task: int, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * task + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    ids = ids[rows]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def method_args(name: str) -> dict:
    common = {"lr": 3e-3}
    if name == "gorp":
        return {
            **common,
            "full_rank_lr": 3e-3,
            "update_gap": 5,
            "rank": 4,
            "scale": 1.0,
            "lora_dropout": 0.0,
            "proj_method": "svd",
            "adapter_init": "kaiming",
        }
    if name == "gorp-orthogonal":  # the default init: task 2's adapters start off task 1's memory
        return {**method_args("gorp"), "adapter_init": "orthogonal"}
    if name == "gorp-wide":  # m < n: the left projection, the memory on the input axis, weight decay kept off it
        return {**method_args("gorp"), "full_rank_targets": ["mlp.down_proj"], "weight_decay": 0.1}
    if name == "gorp-randomized":
        return {**method_args("gorp"), "proj_method": "randomized"}
    if name == "galore":
        return {**common, "update_gap": 5, "rank": 4, "scale": 1.0}
    raise ValueError(name)


def run(rank: int, world: int, method_names: list[str], out: str, port: int) -> None:
    """Each named method's sequence in turn (one process group for all: starting processes is the slow part);
    rank 0 writes ``<out>/<method>.safetensors``."""
    sharded = world > 1
    if sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in method_names:
        tensors = train_sequence(rank, world, name)
        if rank == 0:
            save_file(tensors, os.path.join(out, f"{name}.safetensors"))
    if sharded:
        dist.destroy_process_group()


def train_sequence(rank: int, world: int, method_name: str) -> dict[str, torch.Tensor]:
    sharded = world > 1
    method = build_method(method_name.split("-")[0], **method_args(method_name))
    model = tiny_llama(seed=0)
    losses = []
    for task in range(2):
        torch.manual_seed(task)  # the same LoRA initialization on every rank and in the reference
        model = method.setup_task(model, task)
        if sharded:
            shard_model(model)
        opt = method.make_optimizer(model)
        for step in range(STEPS):
            loss = torch.tensor(train_step(model, method, opt, batch(task, step, rank, world), grad_clip=1.0))
            if sharded:  # the global-batch loss: mean of the equal-sized local batches
                dist.all_reduce(loss)
                loss /= world
            losses.append(loss.item())
        method.end_task(model, opt)
        if sharded:
            plain = method.finalize_state_dict({k: v.detach().clone() for k, v in full_state_dict(model).items()})
            model = tiny_llama(seed=0)
            model.load_state_dict(plain)
        else:
            model = method.finalize(model)
    tensors = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"state/{k}": v.contiguous() for k, v in method.state_tensors().items()})
    tensors.update({f"stats/{k}": torch.tensor(v, dtype=torch.float64) for k, v in method.task_stats().items()})
    tensors["losses"] = torch.tensor(losses)
    return tensors
