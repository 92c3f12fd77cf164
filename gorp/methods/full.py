"""Full fine-tuning: AdamW on every weight, nothing carried but the weights themselves."""

from __future__ import annotations

from torch import nn

from gorp.methods.base import AdamWMethod, BatchSource, MethodArgs


class Full(AdamWMethod):
    name = "full"
    Args = MethodArgs

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
