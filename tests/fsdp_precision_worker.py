"""One GORP task on the tiny model with a given precision and activation checkpointing, sharded with FSDP2 over gloo
(spawned by test_precision.py) or in one process; rank 0 saves the merged weights, the task memory and the losses."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from gorp.fsdp import full_state_dict, shard_model
from gorp.loop import train_step
from gorp.methods import build_method
from gorp.models import enable_activation_checkpointing
from gorp.optim import ProjAdamW
from gorp.precision import Precision
from tiny_models import tiny_llama

BATCH, SEQ, VOCAB = 4, 12, 128
GORP_ARGS = {"lr": 3e-3, "full_rank_lr": 3e-3, "update_gap": 4, "rank": 4, "scale": 1.0, "lora_dropout": 0.0}


def batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)[rank * BATCH // world : (rank + 1) * BATCH // world]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(rank: int, world: int, cfg: str, out: str, port: int) -> None:
    """``cfg`` (JSON): precision, ac (bool), fsdp (bool: shard even a world of one), steps."""
    c = json.loads(cfg)
    sharded = c["fsdp"]
    if sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    precision = Precision(c["precision"])
    method = build_method("gorp", **GORP_ARGS)
    torch.manual_seed(0)  # the same LoRA initialization on every rank
    model = method.setup_task(tiny_llama(seed=0), 0)
    if c["ac"]:
        enable_activation_checkpointing(model)
    if sharded:
        shard_model(model, mp_policy=precision.mp_policy())
    opt = method.make_optimizer(model)
    losses = []
    for step in range(c["steps"]):
        # under FSDP2 the casts come from the policy; the autocast of train_step is then a no-op
        loss = torch.tensor(train_step(model, method, opt, batch(step, rank, world), 1.0, precision))
        if sharded and world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    dtypes = _state_dtypes(model, opt)
    method.end_task(model, opt)
    sd = full_state_dict(model) if sharded else model.state_dict()
    plain = method.finalize_state_dict({k: v.detach().clone() for k, v in sd.items()})
    if rank == 0:
        tensors = {f"model/{k}": v.contiguous() for k, v in plain.items()}
        tensors.update({f"state/{k}": v.contiguous() for k, v in method.state_tensors().items()})
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(tensors, out, metadata={"dtypes": json.dumps(dtypes)})
    if sharded:
        dist.destroy_process_group()


def _state_dtypes(model: torch.nn.Module, opt: ProjAdamW) -> dict[str, list[str]]:
    """Every dtype seen in the trainable parameters, their gradients' slot and the optimizer state, by kind."""
    out: dict[str, set[str]] = {"params": set(), "opt": set()}
    for p in model.parameters():
        if p.requires_grad:
            out["params"].add(str(p.dtype))
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point():
                out["opt"].add(f"{k}:{v.dtype}")
    return {k: sorted(v) for k, v in out.items()}
