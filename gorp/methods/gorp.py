"""GORP (arXiv 2507.02503): LoRA and full-rank weights trained jointly inside one low-rank gradient subspace.

Per task: a fresh LoRA pair (PEFT; A Kaiming, then moved off the task memory, B zero) on the attention query/value
projections, plus full-rank training of a chosen set of weights (LLaMA: mlp.gate_proj; T5: decoder cross-attention
q/v) with the low-rank projector. Three optimizer groups: plain AdamW (LoRA B), LoRA A and the projected full-rank
weights, the last two kept off the task memory.
At task end the final first moments are folded into the memory (90% energy; ``memory_rule`` picks the growth rule, see
:mod:`gorp.memory`) and the adapter is merged into the weights, so that the next task starts from everything learned so
far.

What the memory alone cannot protect: LoRA A's gradient and update avoid the stored input-space basis S of its module,
but a fresh adapter's A is random (Kaiming) and B is free, so the adapter's product B A can act on the inputs that
earlier tasks used. B starts at zero and its gradient is (dL/dy) (A x)^T, so B's first step changes B A by dB A, whose
input side is A's row space; later steps add B dA too, whose input side is dA's row space (kept off S). So
``adapter_init="orthogonal"`` starts each new A in the orthogonal complement of S (Kaiming, then A <- A - (A S) S^T,
rescaled to the Kaiming norm): A then stays off S for the whole task, B A S = 0, and the merged adapter leaves the
weights' action on S unchanged. It is the default: on the six-task WordNet stream (benchmarks/continual.py, 2 seeds) it
raised AA from 54.2 to 57.9 and BWT from -7.2 to -1.5 points against ``"kaiming"``, the paper's (and PEFT's)
initialization, which stays selectable.

Two defects of the released code are fixed here, by construction and by test: the memory is carried to the next task
(``state_tensors``), and the full-rank updates are part of the model that the next task starts from (``finalize``).
Earlier tasks' adapters are merged rather than kept as frozen side modules: the output is the same and the stage's model
stays a plain Hugging Face model (servable, and shardable by FSDP2 without PEFT bookkeeping).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gorp.memory import TaskMemory, check_rule
from gorp.methods.base import (
    BatchSource,
    ContinualMethod,
    LoraArgs,
    add_lora,
    freeze_all,
    lora_pairs,
    named_trainable,
    strip_peft,
    unfreeze,
)
from gorp.optim import ProjAdamW

ADAPTER_INITS = ("kaiming", "orthogonal")


@dataclasses.dataclass
class GorpArgs(LoraArgs):
    lr: float = 1e-3  # LoRA learning rate
    full_rank_lr: float = 1e-5
    rank: int = 8  # projection rank of the full-rank weights
    update_gap: int = 10  # refresh interval T
    scale: float = 0.25
    # the refresh: "randomized" (range finder in float32, 2 power iterations; 0.95x AdamW's optimizer step on SmolLM2,
    # benchmarks/results/optimizer_step_smollm2_refresh.txt) or "svd" (exact float64 eigendecomposition, 3.0x)
    proj_method: str = "randomized"
    refresh: str = "fixed"
    adaptive_threshold: float = 0.4
    memory_threshold: float = 0.9
    memory_rule: str = "energy"  # or "gpm": the same memory inside GORP's training (see gorp.memory)
    adapter_init: str = "orthogonal"  # a new LoRA A starts off the stored basis; "kaiming": the paper's init
    use_memory: bool = True  # off: the ablation without task memory (and what the released code effectively ran)
    project: bool = True  # off: plain AdamW on the same parameters (benchmark of the projection's own cost)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.memory_threshold <= 1.0:
            raise ValueError(f"memory_threshold must be in (0, 1], got {self.memory_threshold}")
        check_rule(self.memory_rule)
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"adapter_init must be one of {ADAPTER_INITS}, got {self.adapter_init!r}")


class Gorp(ContinualMethod):
    name = "gorp"
    Args = GorpArgs

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.memory = TaskMemory(self.args.memory_threshold, rule=self.args.memory_rule)
        self.removed: dict[str, float] = {}  # parameter -> share of its gradient energy the memory removed (last task)

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        targets = self.targets(model)
        freeze_all(model)
        model = add_lora(model, targets.lora, self.args.lora_r, self.args.lora_alpha, self.args.lora_dropout)
        overlap = set(targets.lora) & set(targets.full_rank)
        if overlap:
            raise ValueError(f"modules cannot be both LoRA and full-rank targets: {sorted(overlap)[:3]}")
        unfreeze(model, targets.full_rank)
        if self.args.adapter_init == "orthogonal" and self.args.use_memory:
            self._init_adapters_off_memory(model)
        return model

    @torch.no_grad()
    def _init_adapters_off_memory(self, model: nn.Module) -> None:
        """A <- A - (A S) S^T, norm kept, for each new adapter whose module has a stored LoRA A basis S (n x k)."""
        for module, (a, _) in lora_pairs(model).items():
            s = self.memory.bases.get(f"{module}.lora_A")  # the key param_groups gives LoRA A (input axis n)
            if s is None or s.shape[1] == 0:
                continue
            s = s.to(device=a.device, dtype=torch.float64)
            x = a.to(torch.float64)
            norm = x.norm()
            for _ in range(2):  # twice: what remains inside S after one pass is at rounding level
                x = x - (x @ s) @ s.T
            if x.norm() > 0:
                x = x * (norm / x.norm())
            a.copy_(x.to(a.dtype))

    def param_groups(self, model: nn.Module) -> list[dict]:
        a = self.args
        full_rank = {f"{strip_peft(m)}.weight" for m in self.targets(model).full_rank}
        plain, lora_a, full = [], [], []
        for name, p in named_trainable(model):
            if ".lora_A." in name:
                lora_a.append((name.split(".lora_A.")[0] + ".lora_A", p))
            elif name in full_rank:
                full.append((name, p))
            else:
                plain.append((name, p))
        if not self.args.project:  # the ablation: the same parameters, plain AdamW
            return [
                {"params": [p for _, p in plain + lora_a], "lr": a.lr},
                {"params": [p for _, p in full], "lr": a.full_rank_lr},
            ]
        groups = [
            {"kind": "plain", "params": [p for _, p in plain], "names": [n for n, _ in plain], "lr": a.lr},
            {"kind": "lora_a", "params": [p for _, p in lora_a], "names": [n for n, _ in lora_a], "lr": a.lr},
            {
                "kind": "projected",
                "params": [p for _, p in full],
                "names": [n for n, _ in full],
                "lr": a.full_rank_lr,
                "rank": a.rank,
                "update_gap": a.update_gap,
                "scale": a.scale,
                "proj_method": a.proj_method,
                "refresh": a.refresh,
                "adaptive_threshold": a.adaptive_threshold,
            },
        ]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if not self.args.project:
            return torch.optim.AdamW(self.param_groups(model), lr=self.args.lr, weight_decay=self.args.weight_decay)
        opt = ProjAdamW(self.param_groups(model), lr=self.args.lr, weight_decay=self.args.weight_decay)
        if self.args.use_memory:
            opt.set_basis(self.memory.bases)
        return opt

    def end_task(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, batches: BatchSource | None = None):
        """Fold this task's final first moments into the memory (a collective under FSDP2)."""
        if self.args.use_memory and isinstance(optimizer, ProjAdamW):
            self.removed = optimizer.memory_removed()
            for name, p, g in optimizer.named_params(("lora_a", "projected")):
                moment = optimizer.canonical_moment(p, g)
                if moment is not None:
                    self.memory.update(name, moment)
        super().end_task(model, optimizer)

    def task_stats(self) -> dict[str, float]:
        """How much of the last task's gradient the memory removed: the mean and the largest share over the LoRA A
        matrices and over the full-rank weights (``memory_removed_lora_a``, ``memory_removed_full_rank``, and
        ``..._max``)."""
        shares: dict[str, list[float]] = {"lora_a": [], "full_rank": []}
        for name, share in self.removed.items():
            shares["lora_a" if name.endswith(".lora_A") else "full_rank"].append(share)
        out = {}
        for label, vs in shares.items():
            if vs:
                out[f"memory_removed_{label}"] = sum(vs) / len(vs)
                out[f"memory_removed_{label}_max"] = max(vs)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"memory/{k}": v for k, v in self.memory.bases.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        bad = [k for k in tensors if not k.startswith("memory/")]
        if bad:
            raise ValueError(f"unexpected gorp state entries: {bad[:3]}")
        bases = {k[len("memory/") :]: v for k, v in tensors.items()}
        self.memory = TaskMemory(self.args.memory_threshold, bases, rule=self.args.memory_rule)
