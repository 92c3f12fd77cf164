"""Full fine-tuning: AdamW on every weight, nothing carried but the weights themselves."""

from __future__ import annotations

import torch
from torch import nn

from gorp.methods.base import BatchSource, ContinualMethod, MethodArgs


class Full(ContinualMethod):
    name = "full"
    Args = MethodArgs

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=self.args.lr, weight_decay=self.args.weight_decay)
