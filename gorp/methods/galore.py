"""GaLore: the low-rank gradient projector alone, on every linear weight of the transformer blocks; no task memory.

Norms train with plain AdamW; embeddings and the LM head stay frozen.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from gorp.methods.base import BatchSource, ContinualMethod, MethodArgs, freeze_all, named_trainable, unfreeze


@dataclasses.dataclass
class GaloreArgs(MethodArgs):
    lr: float = 1e-4
    rank: int = 8
    update_gap: int = 200
    scale: float = 0.25
    proj_method: str = "svd"
    refresh: str = "fixed"
    adaptive_threshold: float = 0.4


class Galore(ContinualMethod):
    name = "galore"
    Args = GaloreArgs

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        freeze_all(model)
        unfreeze(model, self.targets(model).linear)
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2]:
                p.requires_grad_(True)
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        a = self.args
        linear = {f"{m}.weight" for m in self.targets(model).linear}
        proj = [(n, p) for n, p in named_trainable(model) if n in linear]
        plain = [(n, p) for n, p in named_trainable(model) if n not in linear]
        hp = {k: getattr(a, k) for k in ("rank", "update_gap", "scale", "proj_method", "refresh", "adaptive_threshold")}
        groups = [
            {"kind": "plain", "params": [p for _, p in plain], "names": [n for n, _ in plain]},
            {"kind": "projected", "params": [p for _, p in proj], "names": [n for n, _ in proj], **hp},
        ]
        return [g for g in groups if g["params"]]
