"""FSDP2 helpers: shard a Hugging Face model per transformer block, gather its full state dict, merge LoRA offline.

FSDP2 (``fully_shard``) works on CPU with gloo and with PEFT LoRA; FSDP1 and Ray's ``prepare_model(parallel_strategy=
"fsdp")`` do not (DESIGN.md section 8). Each transformer block is its own FSDP unit, the root holds the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from gorp.models import strip_peft


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (every nn.ModuleList named ``layers`` or ``block``), in order."""
    blocks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "block", "h"):
            blocks.extend(m)
    if not blocks:
        raise ValueError(f"found no transformer blocks (a ModuleList named layers/block/h) in {type(model).__name__}")
    return blocks


def shard_model(model: nn.Module, mesh=None, mp_policy=None) -> nn.Module:
    """``fully_shard`` each transformer block, then the root (in place; returns the model).

    ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy`` (``gorp.precision.Precision.mp_policy()``); None: float32
    throughout. Activation checkpointing (:func:`gorp.models.enable_activation_checkpointing`) goes on before this.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        import torch.distributed as dist

        device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def full_state_dict(model: nn.Module, *, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict (a collective: every rank calls it). With ``cpu_offload`` only rank 0 gets values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def merge_lora_state_dict(
    sd: dict[str, torch.Tensor], scaling: float, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's state dict with every adapter merged: W <- W + scaling * B A, plain module names."""
    out: dict[str, torch.Tensor] = {}
    a_sfx, b_sfx = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    for key, value in sd.items():
        if key.endswith(a_sfx) or key.endswith(b_sfx):
            continue
        name = strip_peft(key).replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = sd[stem + a_sfx], sd[stem + b_sfx]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out
