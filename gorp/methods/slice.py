"""SLICE: LoRA initialized by gradient surgery against a replay buffer, trained, then merged.

At task start, for every LoRA target weight W (m x n):
  g_c = mean gradient of W over ``init_batches`` batches of the current task,
  g_r = the same over batches of the replay buffer (samples kept from earlier tasks);
  if cos(g_c, g_r) < 0:  g = g_c - c * (<g_c, g_r> / ||g_r||^2) g_r   (c = 1 is PCGrad)  else g = g_c;
  g = U S V^T (truncated SVD);  B = U[:, :r],  A = V^T[r:2r];  A and B rescaled to the standard deviation of W;
  W <- W - s B A  (s = alpha / r), so the model's output is unchanged at initialization.
Then the adapter trains with AdamW and is merged at task end. ``replay_per_task`` samples of each task are kept.

The learning rate defaults to 1e-4, a tenth of plain LoRA's: at 1e-3 SLICE collapsed on the six-task WordNet stream
(benchmarks/continual.py, 2 seeds: AA 15.0, BWT -37.0 points; after each stage it answered the earlier tasks with the
current task's labels), at 1e-4 it did not (AA 56.5, BWT -6.2). Its adapter starts with both factors at the weight's
scale, where LoRA's B starts at zero.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gorp.methods.base import (
    AdamWMethod,
    Batch,
    BatchSource,
    LoraArgs,
    add_lora,
    freeze_all,
    lora_pairs,
    unfreeze,
)


@dataclasses.dataclass
class SliceArgs(LoraArgs):
    lr: float = 1e-4  # see the module docstring: 1e-3 collapsed on wordnet6
    lora_dropout: float = 0.0
    surgery: float = 1.0  # c
    init_batches: int = 4
    replay_per_task: int = 32


def _mean_grads(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    freeze_all(model)
    unfreeze(model, names)
    model.zero_grad(set_to_none=True)
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    grads = {m: modules[m].weight.grad.detach().clone() for m in names}
    model.zero_grad(set_to_none=True)
    freeze_all(model)
    return grads


def gradient_surgery(g_c: torch.Tensor, g_r: torch.Tensor, c: float = 1.0) -> tuple[torch.Tensor, float, bool]:
    """(g, cos(g_c, g_r), applied): g_c minus c times its component along g_r when the two conflict (cos < 0)."""
    dot = (g_c * g_r).sum()
    cos = float(dot / (g_c.norm() * g_r.norm()).clamp_min(1e-30))
    if cos >= 0:
        return g_c, cos, False
    return g_c - c * dot / g_r.square().sum().clamp_min(1e-30) * g_r, cos, True


class Slice(AdamWMethod):
    name = "slice"
    Args = SliceArgs

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.replay: dict[str, torch.Tensor] = {}  # input_ids / attention_mask / labels, padded rows
        self.cosines: dict[str, float] = {}
        self.surgered: dict[str, bool] = {}

    def replay_batches(self, batch_size: int) -> list[Batch]:
        if not self.replay:
            return []
        n = self.replay["input_ids"].shape[0]
        return [{k: v[i : i + batch_size] for k, v in self.replay.items()} for i in range(0, n, batch_size)]

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        a = self.args
        if batches is None:
            raise ValueError("slice needs batches of the current task at setup (for its gradient initialization)")
        names = list(self.targets(model).lora)
        current = []
        for b in batches():
            current.append(b)
            if len(current) == a.init_batches:
                break
        was_training = model.training
        model.eval()  # no dropout while measuring gradients
        g_c = _mean_grads(model, names, current)
        replay = self.replay_batches(current[0]["input_ids"].shape[0])
        g_r = _mean_grads(model, names, replay[: a.init_batches]) if replay else {}
        model.train(was_training)
        modules = dict(model.named_modules())
        init = {}
        for m in names:
            g = g_c[m].double()
            self.surgered[m] = False
            if m in g_r:
                g, self.cosines[m], self.surgered[m] = gradient_surgery(g, g_r[m].double(), a.surgery)
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            r_ = a.lora_r
            if 2 * r_ > min(g.shape):
                raise ValueError(f"slice needs 2 * lora_r <= min(m, n) for {m} (shape {tuple(g.shape)}), got r={r_}")
            std_w = modules[m].weight.detach().double().std()
            B = u[:, :r_]
            A = vh[r_ : 2 * r_]
            init[m] = (A * std_w / A.std(), B * std_w / B.std())
        model = add_lora(model, names, a.lora_r, a.lora_alpha, a.lora_dropout)
        s = a.lora_alpha / a.lora_r
        with torch.no_grad():
            for m, (A, B) in lora_pairs(model).items():
                a_init, b_init = init[m]
                A.copy_(a_init)
                B.copy_(b_init)
                base = model.get_submodule(f"base_model.model.{m}").base_layer.weight
                base -= (s * (b_init @ a_init)).to(base.dtype)
        return model

    def setup_for_plan(self, model: nn.Module) -> nn.Module:
        """The adapters ``setup_task`` adds (same shapes and trainable set), without the gradient initialization."""
        freeze_all(model)
        a = self.args
        return add_lora(model, list(self.targets(model).lora), a.lora_r, a.lora_alpha, a.lora_dropout)

    def end_task(self, model: nn.Module, optimizer, *, batches: BatchSource | None = None):
        """Keep ``replay_per_task`` samples of this task (padded to a common length) for later tasks' surgery."""
        if batches is not None:
            rows: dict[str, list[torch.Tensor]] = {}
            kept = 0
            for b in batches():
                take = min(b["input_ids"].shape[0], self.args.replay_per_task - kept)
                for k in ("input_ids", "attention_mask", "labels"):
                    rows.setdefault(k, []).extend(b[k][:take].cpu())
                kept += take
                if kept >= self.args.replay_per_task:
                    break
            for k, vals in rows.items():
                pad = -100 if k == "labels" else 0
                old = list(self.replay[k]) if k in self.replay else []
                allrows = old + vals
                width = max(v.shape[0] for v in allrows)
                self.replay[k] = torch.stack(
                    [nn.functional.pad(v, (0, width - v.shape[0]), value=pad) for v in allrows]
                )
        super().end_task(model, optimizer)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"replay/{k}": v for k, v in self.replay.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.replay = {k[len("replay/") :]: v for k, v in tensors.items() if k.startswith("replay/")}
