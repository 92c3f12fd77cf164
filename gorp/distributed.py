"""The few collectives the optimizer needs on FSDP2-sharded parameters.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a DTensor sharded on dim 0 (rows) over a 1-D
device mesh. The optimizer works on the local shard (``to_local()``) and calls these helpers where the math needs the
whole matrix. Without a process group (a plain tensor, or a world of one) every helper is the identity, so one code path
serves single-process and sharded training and the two give the same numbers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

ProcessGroup = dist.ProcessGroup | None


def local_and_group(t: torch.Tensor) -> tuple[torch.Tensor, ProcessGroup]:
    """The local shard of ``t`` and the group it is row-sharded over (None when not sharded)."""
    if not isinstance(t, DTensor):
        return t, None
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"gorp's projected optimizer supports FSDP2 on a 1-D device mesh; got a {mesh.ndim}-D mesh "
            f"(placements {placements}). Use fully_shard(mesh=init_device_mesh(device, (world_size,)))."
        )
    placement = placements[0]
    if placement.is_replicate():
        return t.to_local(), None
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(f"expected a parameter sharded on dim 0 (FSDP2's default), got {placement}")
    group = mesh.get_group()
    if dist.get_world_size(group) == 1:
        return t.to_local(), None
    return t.to_local(), group


def all_reduce_sum(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``t`` over ``group`` in place (no-op without a group); returns ``t``."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def row_counts(local: torch.Tensor, group: ProcessGroup) -> list[int]:
    """Number of rows held by each rank of ``group``, in rank order."""
    if group is None:
        return [local.shape[0]]
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    out = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, n, group=group)
    return [int(x.item()) for x in out]


def row_offset(local: torch.Tensor, group: ProcessGroup) -> int:
    """Global index of this rank's first row."""
    if group is None:
        return 0
    counts = row_counts(local, group)
    return sum(counts[: dist.get_rank(group)])


def gather_rows(local: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """The full matrix from row shards of possibly uneven sizes (every rank gets it)."""
    if group is None:
        return local
    counts = row_counts(local, group)
    width = max(counts)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)], dim=0)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(x: float) -> float:
    """The mean of a Python number over all ranks of the default group (the number itself in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world
