"""Sequential LoRA (PEFT): one adapter on the attention query/value projections, continued from task to task.

The stage's model is the merged one (servable as is); the adapter factors are carried as method state so the next task
continues the *same* adapter: its base weights are recovered as W - s B A before the adapter is re-attached. With
``continue_adapter=False`` every task starts a fresh adapter on the merged weights instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gorp.methods.base import (
    AdamWMethod,
    BatchSource,
    LoraArgs,
    add_lora,
    freeze_all,
    lora_pairs,
    strip_peft,
)


@dataclasses.dataclass
class SeqLoraArgs(LoraArgs):
    continue_adapter: bool = True


class Lora(AdamWMethod):
    name = "lora"
    Args = SeqLoraArgs

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.adapter: dict[str, torch.Tensor] = {}

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        a = self.args
        targets = self.targets(model)
        freeze_all(model)
        carried = a.continue_adapter and bool(self.adapter)
        if carried:  # recover the base weights under the carried adapter: W0 = W - s B A
            s = a.lora_alpha / a.lora_r
            modules = dict(model.named_modules())
            with torch.no_grad():
                for m in targets.lora:
                    w = modules[m].weight
                    w -= s * (self.adapter[f"{m}.lora_B"] @ self.adapter[f"{m}.lora_A"]).to(w.dtype)
        model = add_lora(model, targets.lora, a.lora_r, a.lora_alpha, a.lora_dropout)
        if carried:
            with torch.no_grad():
                for m, (A, B) in lora_pairs(model).items():
                    A.copy_(self.adapter[f"{m}.lora_A"])
                    B.copy_(self.adapter[f"{m}.lora_B"])
        return model

    def _capture(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self.args.continue_adapter:
            self.adapter = {}
            for m, (A, B) in pairs.items():
                self.adapter[f"{m}.lora_A"] = A.detach().float().cpu().clone()
                self.adapter[f"{m}.lora_B"] = B.detach().float().cpu().clone()

    def finalize(self, model: nn.Module) -> nn.Module:
        self._capture(lora_pairs(model))
        return super().finalize(model)

    def finalize_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stems = [k[: -len(".lora_A.default.weight")] for k in sd if k.endswith(".lora_A.default.weight")]
        self._capture(
            {strip_peft(s): (sd[f"{s}.lora_A.default.weight"], sd[f"{s}.lora_B.default.weight"]) for s in stems}
        )
        return super().finalize_state_dict(sd)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"adapter/{k}": v for k, v in self.adapter.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.adapter = {k[len("adapter/") :]: v for k, v in tensors.items() if k.startswith("adapter/")}
