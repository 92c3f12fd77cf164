"""A memory plan: the bytes one worker needs to train a stage, per component, before anything is loaded.

``plan_memory(config, method, method_args, batch_size=..., seq_len=..., workers=..., fsdp=..., precision=...)`` returns
a :class:`MemoryPlan` for one worker:

* **parameters**: the float32 master weights (divided by the workers under FSDP), plus the compute copies that exist
  while training: under FSDP the root's and two blocks' unsharded parameters (in bf16 with the mixed-precision policy);
* **gradients**: float32, one per trainable parameter (sharded under FSDP);
* **optimizer state**: counted from the method's own parameter groups: Adam's two float32 moments for plain and LoRA
  groups; for GORP/GaLore's projected weights the projection (r x n or m x r) and the moments of the projected
  gradient (m x r or n x r) only; the task memory of earlier tasks (``tasks``) at up to ``rank`` directions per task;
* **activations**: what autograd keeps for the backward at the worker's micro-batch (``batch_size / workers`` rows of
  ``seq_len`` tokens), counted by running the model's forward on *fake* tensors (``FakeTensorMode``: shapes and dtypes,
  no memory, no arithmetic) under the same autocast, adapters and activation checkpointing as the real run, so it
  holds for any architecture Transformers builds; plus the largest transient of the backward: the loss head's (the
  gradients of the log-probabilities and of the logits: two float32 batch x seq x vocab tensors) or a block's
  (half a block's activations as gradients; with checkpointing, two blocks: the replayed one and its gradients).

The peak is parameters + optimizer state + the larger of (activations + the gradients that appear first, the output
embedding's) and (gradients + the optimizer step's temporaries): activations are freed as the gradients appear.

The model is built on the meta device from its config (no weights are read), the method's ``setup_for_plan`` adds its
adapters there, and nothing here needs more memory than a few Python objects. Validated against the measured peak
RSS of a few CPU steps (:mod:`gorp.memprobe`, ``tests/test_memplan.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from gorp.precision import Precision

_F32 = 4


@dataclasses.dataclass
class MemoryPlan:
    """Estimated bytes per worker; ``peak`` combines them (see the module docstring)."""

    method: str
    workers: int
    fsdp: bool
    precision: str
    micro_batch: int
    seq_len: int
    params: int  # resident master weights (sharded under FSDP)
    compute_copies: int  # FSDP: unsharded root + two blocks in the compute dtype (0 without FSDP)
    grads: int
    optimizer: int  # state kept between steps (incl. task memory)
    optimizer_temp: int  # transient during optimizer.step()
    activations: int  # saved for the backward + the loss head's backward
    early_grads: int  # gradients that exist while most activations are still alive (the output embedding's)

    @property
    def peak(self) -> int:
        during_backward = self.activations + self.early_grads
        during_step = self.grads + self.optimizer_temp
        return self.params + self.compute_copies + self.optimizer + max(during_backward, during_step)

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("parameters (fp32 master)", self.params),
            ("compute copies (FSDP)", self.compute_copies),
            ("gradients", self.grads),
            (f"optimizer state ({self.method})", self.optimizer),
            ("optimizer step temporaries", self.optimizer_temp),
            (f"activations ({self.micro_batch} x {self.seq_len} tokens)", self.activations),
            ("estimated peak", self.peak),
        ]


# ----------------------------------------------------------------------------------------------- model on meta
def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=torch.float32)


def _setup(config, method: str, method_args: dict[str, Any]):
    from gorp.methods import build_method

    m = build_method(method, **method_args)
    torch.manual_seed(0)
    model = m.setup_for_plan(_meta_model(config))
    return m, model


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


# ----------------------------------------------------------------------------------------------- optimizer state
def _group_state(g: dict[str, Any], world: int, shard: bool) -> tuple[int, int]:
    """(state bytes kept per worker, step temporaries) for one parameter group of the method."""
    kind = g.get("kind", "plain")
    state, temp = 0, 0
    for p in g["params"]:
        m, n = (p.shape[0], p.shape[1]) if p.ndim == 2 else (p.numel(), 1)
        rows = -(-m // world) if shard else m  # FSDP2 shards dim 0
        if kind == "projected":
            r = min(int(g.get("rank", 8)), m, n)
            if m >= n:  # right: P (r x n) replicated, moments on W's (sharded) rows
                state += (r * n + 2 * rows * r) * _F32
            else:  # left: P's rows sharded, moments (n x r) replicated
                state += (rows * r + 2 * n * r) * _F32
        else:
            state += 2 * rows * n * _F32
        temp = max(temp, 3 * rows * n * _F32)  # fp32 gradient, Adam direction and update of the largest weight
    return state, temp


def _task_memory(m, model: nn.Module, tasks: int, world: int, shard: bool) -> int:
    """Bytes of the task-subspace bases a GORP-like method carries into the last of ``tasks`` tasks (upper bound:
    every earlier task adds as many directions as the moment's rank)."""
    if tasks <= 1 or not hasattr(m, "memory"):
        return 0
    a = m.args
    total = 0
    for g in m.param_groups(model):
        for p in g["params"]:
            if g.get("kind") == "lora_a":  # basis on the input axis (n), r directions per task
                total += p.shape[1] * min(p.shape[1], a.lora_r * (tasks - 1)) * _F32
            elif g.get("kind") == "projected":
                mm, n = p.shape
                d = mm if mm >= n else n
                d_local = -(-d // world) if (shard and mm >= n) else d
                total += d_local * min(d, a.rank * (tasks - 1)) * _F32
    return total


# ----------------------------------------------------------------------------------------------- activations
def _fakify(model: nn.Module, mode) -> None:
    """Replace the meta parameters and buffers by fake CPU tensors of the same shapes (tied ones stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in memo:
                    with mode:
                        f = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
                store[k] = memo[id(t)]


def saved_activation_bytes(
    model: nn.Module, batch: int, seq_len: int, *, autocast: torch.dtype | None, checkpointing: bool
) -> int:
    """Bytes autograd keeps for the backward of one forward on ``batch x seq_len`` tokens (parameters excluded),
    counted on fake tensors. ``model`` (on meta; replaced in place by fake tensors) is consumed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gorp.models import enable_activation_checkpointing

    if checkpointing:
        enable_activation_checkpointing(model)
    mode = FakeTensorMode()
    _fakify(model, mode)
    model.train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in params:
            saved[st._cdata] = st.nbytes()
        return t

    vocab = model.config.vocab_size
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ids = torch.zeros((batch, seq_len), dtype=torch.long)
        kw = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            model(input_ids=ids, labels=ids, **kw)
    del vocab
    return sum(saved.values())


# ----------------------------------------------------------------------------------------------- the plan
def plan_memory(
    config,
    method: str,
    method_args: dict[str, Any] | None = None,
    *,
    batch_size: int,
    seq_len: int,
    workers: int = 1,
    fsdp: bool = False,
    precision: str | Precision = "fp32",
    activation_checkpointing: bool = False,
    tasks: int = 1,
    device: str = "cpu",
) -> MemoryPlan:
    """Estimated bytes per worker for one training stage (see the module docstring).

    ``config``: a Transformers config (``AutoConfig.from_pretrained(folder)``); ``batch_size``: the global batch, split
    over ``workers``; ``fsdp``: FSDP2 over the workers (without it every worker holds the whole model); ``tasks``: the
    stream's length (the task memory grows with it); ``device``: "cuda" counts torch AdamW's multi-tensor step
    temporaries (a float32 copy of every trainable weight), "cpu" its one-tensor-at-a-time step.
    """
    prec = precision if isinstance(precision, Precision) else Precision(precision)
    method_args = dict(method_args or {})
    shard = fsdp and workers > 1
    world = workers if shard else 1
    if batch_size % workers:
        raise ValueError(f"batch_size {batch_size} is not divisible by {workers} workers")
    micro = batch_size // workers
    m, model = _setup(config, method, method_args)
    params = _unique(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    total = sum(_nbytes(p) for p in params) + sum(_nbytes(b) for b in model.buffers())
    grads = sum(_nbytes(p) for p in trainable)
    state, temp = 0, 0
    for g in m.param_groups(model):
        s, t = _group_state(g, world, shard)
        state, temp = state + s, max(temp, t)
    if device == "cuda" and not any(g.get("kind") for g in m.param_groups(model)):
        temp = max(temp, grads // world)  # torch AdamW's foreach path on accelerators
    state += _task_memory(m, model, tasks, world, shard)
    copies = _fsdp_copies(model, prec) if shard else 0
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    early = _nbytes(out_emb.weight) if out_emb is not None and out_emb.weight.requires_grad else 0
    acts = _activations(config, method, method_args, prec, shard, micro, seq_len, activation_checkpointing)
    return MemoryPlan(
        method=method,
        workers=workers,
        fsdp=shard,
        precision=prec.name,
        micro_batch=micro,
        seq_len=seq_len,
        params=total // world,
        compute_copies=copies,
        grads=grads // world,
        optimizer=state,
        optimizer_temp=temp,
        activations=acts,
        early_grads=early // world,
    )


def _activations(config, method, method_args, prec: Precision, shard: bool, micro: int, seq_len: int, ac: bool) -> int:
    """Saved activations + the largest backward transient: the loss head's (the gradients of the log-probabilities
    and of the logits, float32) or one block's (its activations again as gradients; with checkpointing also the
    replayed block)."""
    from gorp.fsdp import transformer_blocks

    autocast = prec.compute_dtype if (prec.mixed and not shard) else None
    saved = {}
    for checkpointing in sorted({False, ac}):
        _, model = _setup(config, method, method_args)
        if prec.mixed and shard:  # FSDP's policy: the blocks compute on bf16 parameters
            model.to(prec.compute_dtype)
        layers = len(transformer_blocks(model))
        saved[checkpointing] = saved_activation_bytes(
            model, micro, seq_len, autocast=autocast, checkpointing=checkpointing
        )
    per_block = (saved[False] - saved[ac]) / layers if ac else saved[False] / layers
    head = 2 * micro * seq_len * config.vocab_size * _F32
    # without checkpointing the block being differentiated frees its saved tensors as its gradients appear (half a
    # block at once, measured on the tiny model); with it the replayed block and its gradients coexist (two)
    return int(saved[ac] + max(head, (2.0 if ac else 0.5) * per_block))


def _fsdp_copies(model: nn.Module, prec: Precision) -> int:
    """Unsharded compute copies under FSDP2: the root's parameters (kept through the backward) and two blocks (the
    one running and the one prefetched), in the compute dtype."""
    from gorp.fsdp import transformer_blocks

    blocks = transformer_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in _unique(model.parameters()) if id(p) not in in_blocks)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    size = torch.tensor([], dtype=prec.compute_dtype).element_size()
    return (root + 2 * block) * size


# ----------------------------------------------------------------------------------------------- report
def visible_memory() -> dict[str, int]:
    """Memory this process can see: ``host`` (MemAvailable, or physical pages) and ``device`` (free on the current
    accelerator), in bytes; a key is missing when unknown."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        out["host"] = info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError):
        try:
            out["host"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    if torch.cuda.is_available():
        out["device"] = torch.cuda.mem_get_info()[0]
    return out


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def memory_report(plans: list[MemoryPlan], others: dict[str, int] | None = None) -> str:
    """A text table, one column per plan (e.g. without and with FSDP); ``others``: optimizer state of other methods."""
    width = 44
    head = "".join(f"{('FSDP x' + str(p.workers)) if p.fsdp else 'no FSDP':>14}" for p in plans)
    lines = [f"{'per worker':<{width}}{head}"]
    for i, (label, _) in enumerate(plans[0].rows()):
        lines.append(f"{label:<{width}}" + "".join(f"{fmt_bytes(p.rows()[i][1]):>14}" for p in plans))
    if others:
        lines.append(
            "optimizer state by method (no FSDP): " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in others.items())
        )
    return "\n".join(lines)


def memory_warnings(plan: MemoryPlan, visible: dict[str, int] | None = None, *, on_gpu: bool = False) -> list[str]:
    """Messages for a plan whose peak exceeds the memory visible here (device when ``on_gpu``, else host)."""
    visible = visible_memory() if visible is None else visible
    key = "device" if on_gpu else "host"
    have = visible.get(key)
    if have is None or plan.peak <= have:
        return []
    where = "accelerator" if on_gpu else "host"
    mode = f"FSDP over {plan.workers} workers" if plan.fsdp else "no FSDP"
    return [
        f"estimated peak {fmt_bytes(plan.peak)} per worker ({plan.method}, {plan.precision}, {mode}) exceeds the "
        f"{fmt_bytes(have)} of {where} memory visible here: use bf16, activation checkpointing, FSDP over more "
        "workers, or a smaller batch / sequence length"
    ]
