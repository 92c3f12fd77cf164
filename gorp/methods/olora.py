"""O-LoRA (Wang et al. 2023): a new LoRA per task, kept orthogonal to earlier tasks' LoRA A subspaces.

loss = task loss + lambda1 * sum_modules sum |A_old A_new^T|  +  lambda2 * sum_{new LoRA params} ||P||_2

A_old stacks (rows) every earlier task's A for that module. Earlier adapters are merged into the weights (same output as
keeping them frozen beside the new one); their A matrices are carried as method state for the regularizer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gorp.methods.base import AdamWMethod, BatchSource, LoraArgs, add_lora, freeze_all, lora_pairs


@dataclasses.dataclass
class OloraArgs(LoraArgs):
    lambda1: float = 0.5
    lambda2: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ValueError(f"lambda1 and lambda2 must be >= 0, got {self.lambda1}, {self.lambda2}")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class Olora(AdamWMethod):
    name = "olora"
    Args = OloraArgs

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.old_a: dict[str, torch.Tensor] = {}  # module -> (k x n), rows = earlier tasks' A

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        a = self.args
        freeze_all(model)
        return add_lora(model, self.targets(model).lora, a.lora_r, a.lora_alpha, a.lora_dropout)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        a = self.args
        terms = []
        for m, (A, B) in lora_pairs(model).items():
            A_full = _full(A)
            old = self.old_a.get(m)
            if a.lambda1 and old is not None:
                terms.append(a.lambda1 * (old.to(A_full) @ A_full.T).abs().sum())
            if a.lambda2:
                terms.append(a.lambda2 * (torch.linalg.norm(A_full) + torch.linalg.norm(_full(B))))
        return torch.stack(terms).sum() if terms else None

    def end_task(self, model: nn.Module, optimizer, *, batches: BatchSource | None = None):
        for m, (A, _) in lora_pairs(model).items():
            A_full = _full(A).detach().float().cpu()
            self.old_a[m] = A_full if m not in self.old_a else torch.cat([self.old_a[m], A_full], dim=0)
        super().end_task(model, optimizer)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"old_a/{k}": v for k, v in self.old_a.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.old_a = {k[len("old_a/") :]: v for k, v in tensors.items() if k.startswith("old_a/")}
