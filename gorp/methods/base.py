"""The interface every continual-learning method implements, and what they share.

The lifecycle of one task (stage), the same in a notebook loop and in a Ray Train worker:

    model = method.setup_task(model, task, batches=...)   # unsharded: add adapters, unfreeze, initialize
    (shard the model with FSDP2 here, if distributed)
    opt = method.make_optimizer(model)                     # param groups + carried memory
    for batch in ...: loss = model(**batch).loss + method.extra_loss(model); backward; clip; opt.step()
    method.end_task(model, opt, batches=...)               # collective: fold this task into the carried state
    (gather the full state dict here, if sharded)
    model = method.finalize(model)                         # unsharded: merge adapters -> a plain HF model

``state_tensors()`` / ``load_state_tensors()`` carry the method's state between stages (and machines) as safetensors;
``hparams`` is plain JSON. A method holds no reference to a model between calls.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gorp.models import Targets, resolve_targets, strip_peft

Batch = dict[str, torch.Tensor]
BatchSource = Callable[[], Iterable[Batch]]

STATE_FILE = "method_state.safetensors"
META_FILE = "method.json"


@dataclasses.dataclass
class MethodArgs:
    """Hyperparameters shared by every method; subclasses add their own. Validated in ``__post_init__``."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    lora_targets: list[str] | None = None  # module-name suffixes; None: the architecture's defaults
    full_rank_targets: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("rank") or f.name in ("lora_r", "update_gap"):
                if not (isinstance(v, int) and v > 0):
                    raise ValueError(f"{f.name} must be a positive integer, got {v!r}")


@dataclasses.dataclass
class LoraArgs(MethodArgs):
    """Hyperparameters of methods that train PEFT LoRA adapters (on the attention query/value projections)."""

    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


class ContinualMethod:
    """Base class: subclasses set ``name`` and ``Args`` and override the hooks they need."""

    name: ClassVar[str]
    Args: ClassVar[type[MethodArgs]] = MethodArgs

    def __init__(self, **hparams: Any):
        known = {f.name for f in dataclasses.fields(self.Args)}
        unknown = set(hparams) - known
        if unknown:
            raise ValueError(
                f"method {self.name!r} got unknown hyperparameters {sorted(unknown)}; known: {sorted(known)}"
            )
        self.args = self.Args(**hparams)
        self.tasks_seen = 0

    # ---------------------------------------------------------------- hooks
    def targets(self, model: nn.Module) -> Targets:
        return resolve_targets(model, self.args.lora_targets, self.args.full_rank_targets)

    def setup_task(self, model: nn.Module, task: int, *, batches: BatchSource | None = None) -> nn.Module:
        raise NotImplementedError

    def setup_for_plan(self, model: nn.Module) -> nn.Module:
        """``setup_task`` for the memory plan (:mod:`gorp.memplan`): the trainable parameters a task adds, on a model
        on the meta device and without data; a method whose setup reads batches overrides it."""
        return self.setup_task(model, 0)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from gorp.optim import ProjAdamW

        return ProjAdamW(self.param_groups(model), lr=self.args.lr, weight_decay=self.args.weight_decay)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def end_task(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, batches: BatchSource | None = None):
        self.tasks_seen += 1

    def finalize(self, model: nn.Module) -> nn.Module:
        """Merge whatever the task added into plain weights; returns the underlying model."""
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        return model

    def finalize_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``finalize`` on a full state dict gathered from a sharded model: LoRA merged, plain module names."""
        from gorp.fsdp import merge_lora_state_dict

        if any(".lora_A." in k for k in sd):
            return merge_lora_state_dict(sd, self.args.lora_alpha / self.args.lora_r)
        return {strip_peft(k): v for k, v in sd.items()}

    def task_stats(self) -> dict[str, float]:
        """What the method measured while training the task that just ended (after ``end_task``); {} by default."""
        return {}

    # ---------------------------------------------------------------- carried state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"method {self.name!r} carries no state, got {sorted(tensors)[:3]}...")

    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self.args)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        save_file(tensors, str(folder / STATE_FILE))
        meta = {"method": self.name, "hparams": self.hparams(), "tasks_seen": self.tasks_seen}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | Path, **overrides: Any) -> ContinualMethod:
        """Rebuild a method with its carried state from ``save``'s folder (hyperparameters may be overridden)."""
        from gorp.methods import build_method

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        method = build_method(meta["method"], **{**meta["hparams"], **overrides})
        method.tasks_seen = int(meta["tasks_seen"])
        method.load_state_tensors(load_file(str(folder / STATE_FILE)))
        return method


class AdamWMethod(ContinualMethod):
    """A method whose trainable parameters all go to one torch AdamW (the baselines)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=self.args.lr, weight_decay=self.args.weight_decay)


# -------------------------------------------------------------------- shared helpers
def named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield strip_peft(name), p


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model: nn.Module, module_names: Iterable[str]) -> None:
    """Make the weights of the named modules (names in the underlying model) trainable."""
    wanted = set(module_names)
    found = set()
    for name, module in model.named_modules():
        base = strip_peft(name)
        if base in wanted:
            module.weight.requires_grad_(True)
            found.add(base)
    missing = wanted - found
    if missing:
        raise ValueError(f"modules not found in the model: {sorted(missing)[:5]}")


def add_lora(model: nn.Module, modules: Iterable[str], r: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap ``model`` with one fresh PEFT LoRA adapter (A Kaiming-uniform, B zero) on exactly ``modules``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(modules), bias="none")
    with warnings.catch_warnings():  # PEFT reads a property Transformers 5 deprecated: nothing a user can act on
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, cfg)


def lora_pairs(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """{module name: (lora_A weight (r x n), lora_B weight (m x r))} of the active adapter."""
    out: dict[str, list] = {}
    for name, p in model.named_parameters():
        for part, idx in ((".lora_A.", 0), (".lora_B.", 1)):
            if part in name:
                out.setdefault(strip_peft(name.split(part)[0]), [None, None])[idx] = p
    return {k: (a, b) for k, (a, b) in out.items()}
