"""A plain training loop over one task: forward, method loss, backward, clip, step. No Ray, no logging framework.

The Ray Train stage (pipelines/) runs the same steps on each worker; this loop serves tests, benchmarks and notebooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from gorp.methods.base import Batch, ContinualMethod
from gorp.precision import Precision


def train_step(
    model: nn.Module,
    method: ContinualMethod,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    grad_clip: float | None,
    precision: Precision | None = None,
) -> float:
    """One optimizer step; returns the task loss (without the method's extra loss).

    ``precision``: bf16 runs the forward and the loss under ``torch.autocast`` (float32 parameters and gradients);
    None or fp32: plain float32. Under FSDP2 the bf16 casts come from the sharding's ``MixedPrecisionPolicy`` instead
    (:func:`gorp.fsdp.shard_model`), and passing the precision here as well changes nothing.
    """
    device_type = batch["input_ids"].device.type
    with (precision or Precision()).autocast(device_type):
        loss = model(**batch).loss  # the logits (batch x seq x vocab) are not kept through the backward
        extra = method.extra_loss(model)
        total = loss if extra is None else loss + extra
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_task(
    model: nn.Module,
    method: ContinualMethod,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    grad_clip: float | None = 1.0,
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    precision: Precision | None = None,
) -> list[float]:
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        losses.append(train_step(model, method, optimizer, batch, grad_clip, precision))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def run_task(
    model: nn.Module,
    method: ContinualMethod,
    task: int,
    batches: Callable[[], Iterable[Batch]],
    **kwargs,
) -> tuple[nn.Module, list[float]]:
    """setup -> train -> end -> finalize for one task on one process; returns the plain (merged) model and losses."""
    model = method.setup_task(model, task, batches=batches)
    optimizer = method.make_optimizer(model)
    losses = train_task(model, method, optimizer, batches(), **kwargs)
    method.end_task(model, optimizer, batches=batches)
    return method.finalize(model), losses
