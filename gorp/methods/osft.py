"""Adaptive-SVD constrained full fine-tuning ("Sculpting Subspaces", arXiv 2504.07097).

At each task start every target weight is decomposed, W = U S V^T; the top-k singular triplets are frozen and the
update is confined to the orthogonal complement of both frozen subspaces, dW = (I - U_k U_k^T) X (I - V_k V_k^T), for
the gradient before Adam and again for the final Adam direction. The paper trains the low singular factors with their
gradients projected off U_k, V_k; confining the update of W itself spans the same set of updates and keeps the model a
plain set of weights (FSDP2 shards it as is). So U_k^T W V_k = S_k and W V_k, U_k^T W stay exactly as they were.

k = round(retain * min(m, n)) per weight (``retain`` default 0.5). With ``retain_by="importance"`` the fraction per
layer follows the share of the energy held by the top half of the spectrum (layers whose spectrum is concentrated keep
more), clipped to [retain_min, retain_max].
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gorp.methods.base import BatchSource, ContinualMethod, MethodArgs, freeze_all, named_trainable, unfreeze
from gorp.optim import ProjAdamW


@dataclasses.dataclass
class OsftArgs(MethodArgs):
    lr: float = 1e-5
    retain: float = 0.5
    retain_by: str = "fixed"  # or "importance"
    retain_min: float = 0.1
    retain_max: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.retain < 1.0:
            raise ValueError(f"retain must be in [0, 1), got {self.retain}")
        if self.retain_by not in ("fixed", "importance"):
            raise ValueError(f"retain_by must be 'fixed' or 'importance', got {self.retain_by!r}")


class Osft(ContinualMethod):
    name = "osft"
    Args = OsftArgs

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight name -> (U_k, V_k), per task

    def retained(self, s: torch.Tensor) -> int:
        a = self.args
        frac = a.retain
        if a.retain_by == "importance":
            e = s.double().square()
            frac = float(e[: max(1, len(s) // 2)].sum() / e.sum()) if e.sum() > 0 else a.retain
            frac = min(max(frac, a.retain_min), a.retain_max)
        return int(round(frac * len(s)))

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        targets = self.targets(model).linear
        freeze_all(model)
        unfreeze(model, targets)
        modules = dict(model.named_modules())
        self.frozen = {}
        for m in targets:
            w = modules[m].weight.detach().to(torch.float64)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            k = self.retained(s)
            self.frozen[f"{m}.weight"] = (u[:, :k].float().contiguous(), vh[:k].T.float().contiguous())
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        named = list(named_trainable(model))
        return [{"kind": "orthogonal", "params": [p for _, p in named], "names": [n for n, _ in named]}]

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        opt = ProjAdamW(self.param_groups(model), lr=self.args.lr, weight_decay=self.args.weight_decay)
        for name, p, _ in opt.named_params(("orthogonal",)):
            u, v = self.frozen[name]
            opt.set_frozen_subspace(p, u, v)
        return opt
