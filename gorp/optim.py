"""ProjAdamW: AdamW with GORP's parameter groups, low-rank gradient projection and task-subspace removal.

One optimizer, four kinds of parameter group (``kind`` in the group dict):

``plain``      AdamW (LoRA B, norms, everything else).
``lora_a``     AdamW on LoRA A (r x n) whose gradient and update are kept off the stored input-space basis S (n x k):
               X <- X - (X S) S^T.
``projected``  a full-rank weight trained inside a rank-``rank`` gradient subspace refreshed every ``update_gap`` steps
               (or adaptively); Adam moments live on the projected gradient R; R and the Adam direction are kept off
               the stored basis S on the axis the projection keeps (see :mod:`gorp.projector`).
``orthogonal`` a full-rank weight whose gradient and update are confined to the complement of frozen singular
               subspaces: X <- (I - U U^T) X (I - V V^T) (adaptive-SVD / "Sculpting Subspaces" fine-tuning).

Every piece of state is a tensor (moments, projection, bases, counters), so ``state_dict()`` round-trips exactly and the
optimizer works under FSDP2: each rank holds its row shard of every state tensor that has a row axis of W, and the
collectives in :mod:`gorp.distributed` make the result equal the single-process one.

Gradient clipping happens before ``step()`` (``torch.nn.utils.clip_grad_norm_``), as in GORP.

``memory_removed()`` says how much the task memory took away: per parameter with a basis, the share of its gradient's
energy (``lora_a``: the gradient; ``projected``: the projected gradient R), summed over the steps this optimizer took,
that lay inside the stored basis and was removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from gorp.distributed import ProcessGroup, all_reduce_sum, gather_rows, local_and_group, row_offset
from gorp.projector import (
    METHODS,
    OVERSAMPLE,
    POWER_ITERS,
    choose_side,
    compute_projection,
    outside_energy,
    project,
    project_back,
)

KINDS = ("plain", "lora_a", "projected", "orthogonal")
REFRESH = ("fixed", "adaptive")

DEFAULTS: dict[str, Any] = {
    "kind": "plain",
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    # projected groups only
    "rank": 8,
    "update_gap": 10,
    "scale": 1.0,
    "proj_method": "randomized",
    "refresh": "fixed",
    "adaptive_threshold": 0.4,
    "oversample": OVERSAMPLE,
    "power_iters": POWER_ITERS,
    "seed": 0,
}


def _validate_group(g: dict[str, Any]) -> None:
    where = f"param group {g.get('name', g['kind'])!r}"
    if g["kind"] not in KINDS:
        raise ValueError(f"{where}: unknown kind {g['kind']!r}; expected one of {KINDS}")
    if not g["lr"] >= 0.0:
        raise ValueError(f"{where}: invalid learning rate {g['lr']} (must be >= 0)")
    if not g["eps"] >= 0.0:
        raise ValueError(f"{where}: invalid eps {g['eps']} (must be >= 0)")
    b1, b2 = g["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{where}: invalid betas {g['betas']} (each must be in [0, 1))")
    if not g["weight_decay"] >= 0.0:
        raise ValueError(f"{where}: invalid weight_decay {g['weight_decay']} (must be >= 0)")
    if g["kind"] == "projected":
        if not (isinstance(g["rank"], int) and g["rank"] > 0):
            raise ValueError(f"{where}: projection rank must be a positive integer, got {g['rank']!r}")
        if not (isinstance(g["update_gap"], int) and g["update_gap"] > 0):
            raise ValueError(
                f"{where}: update_gap (refresh interval T) must be a positive integer, got {g['update_gap']!r}"
            )
        if not g["scale"] > 0:
            raise ValueError(f"{where}: scale must be > 0, got {g['scale']}")
        if g["proj_method"] not in METHODS:
            raise ValueError(f"{where}: unknown proj_method {g['proj_method']!r}; expected one of {METHODS}")
        if g["refresh"] not in REFRESH:
            raise ValueError(f"{where}: unknown refresh {g['refresh']!r}; expected one of {REFRESH}")
        if not 0.0 < g["adaptive_threshold"] < 1.0:
            raise ValueError(f"{where}: adaptive_threshold must be in (0, 1), got {g['adaptive_threshold']}")
    if g["kind"] in ("projected", "orthogonal", "lora_a"):
        for p in g["params"]:
            if p.ndim != 2:
                raise ValueError(f"{where}: kind {g['kind']!r} needs 2-D weights, got shape {tuple(p.shape)}")
    names = g.get("names")
    if names is not None and len(names) != len(g["params"]):
        raise ValueError(f"{where}: 'names' has {len(names)} entries for {len(g['params'])} params")


def remove_rows(x: torch.Tensor, s: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """x - S (S^T x): drop the component of x's columns inside span(S); S (d_i x k) and x (d_i x c) row-sharded."""
    c = all_reduce_sum(s.T @ x, group)
    return x - s @ c


def remove_cols(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x - (x S) S^T: drop the component of x's rows inside span(S); S (n x k) replicated."""
    return x - (x @ s) @ s.T


def _adam_direction(st: dict, grad: torch.Tensor, b1: float, b2: float, eps: float) -> torch.Tensor:
    """Update the moments with ``grad`` and return the bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps)."""
    st["step"] += 1
    t = int(st["step"].item())
    st["exp_avg"].lerp_(grad, 1 - b1)
    st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
    return (st["exp_avg"] / (1 - b1**t)) / denom


class ProjAdamW(Optimizer):
    """AdamW with GORP's projected and subspace-constrained parameter groups (see module docstring).

    Each group is a dict with ``params`` and optionally ``kind`` (default ``plain``), ``names`` (parameter names, needed
    to attach task memory by name), and any of the hyperparameters in ``DEFAULTS``.
    """

    def __init__(self, params: Iterable[dict[str, Any]] | Iterable[torch.Tensor], **defaults: Any):
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"ProjAdamW got unknown hyperparameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        super().__init__(params, {**DEFAULTS, **defaults})
        for g in self.param_groups:
            _validate_group(g)
        # param -> float64 [energy before, energy after] the basis removal, summed over steps (this rank's shard);
        # a diagnostic, kept out of the state dict
        self._removal: dict[torch.Tensor, torch.Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = set(param_group) - set(DEFAULTS) - {"params", "names", "name"}
        if unknown:
            raise ValueError(f"param group has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        super().add_param_group(param_group)
        if "kind" in self.param_groups[-1]:  # validated once defaults are filled in (also from __init__)
            _validate_group(self.param_groups[-1])

    # ------------------------------------------------------------------ memory / constraints
    def named_params(self, kinds: tuple[str, ...] = KINDS) -> Iterable[tuple[str, torch.Tensor, dict]]:
        for g in self.param_groups:
            if g["kind"] in kinds:
                names = g.get("names") or [f"{g['kind']}.{i}" for i in range(len(g["params"]))]
                for name, p in zip(names, g["params"], strict=True):
                    yield name, p, g

    def set_basis(self, bases: dict[str, torch.Tensor]) -> int:
        """Attach full (d x k) task-memory bases by parameter name; returns how many params got one.

        A collective under FSDP2 (row offsets): every rank must call it.
        """
        count = 0
        for name, p, g in self.named_params(("lora_a", "projected")):
            s = bases.get(name)
            if s is None or s.shape[1] == 0:
                continue
            local, group = local_and_group(p)
            if g["kind"] == "projected" and choose_side(p.shape) == "right":
                start = row_offset(local, group)
                s = s[start : start + local.shape[0]]
                expect = local.shape[0]
            else:
                expect = p.shape[1]
            if s.shape[0] != expect:
                raise ValueError(
                    f"basis for {name!r} has {s.shape[0]} rows, expected {expect} (shape {tuple(p.shape)})"
                )
            self.state[p]["basis"] = s.to(device=local.device, dtype=torch.float32).contiguous()
            count += 1
        return count

    def set_frozen_subspace(self, p: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        """Freeze span(U) (m x k) on the output side and span(V) (n x k) on the input side of ``p``."""
        local, group = local_and_group(p)
        start = row_offset(local, group)
        st = self.state[p]
        st["u_frozen"] = u[start : start + local.shape[0]].to(device=local.device, dtype=torch.float32).contiguous()
        st["v_frozen"] = v.to(device=local.device, dtype=torch.float32).contiguous()

    def canonical_moment(self, p: torch.Tensor, g: dict) -> torch.Tensor | None:
        """The full first moment of ``p`` in canonical orientation (d x c), rows on the axis the memory lives on.

        A collective under FSDP2 (gathers row shards): every rank must call it for the same params.
        """
        st = self.state.get(p)
        if not st or "exp_avg" not in st:
            return None
        _, group = local_and_group(p)
        m = st["exp_avg"]
        if g["kind"] == "lora_a":
            return gather_rows(m, group).T  # (r_i, n) shards -> (n, r)
        if choose_side(p.shape) == "right":
            return gather_rows(m, group)  # (m_i, r) shards -> (m, r)
        return m  # (n, r), replicated

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, g in enumerate(self.param_groups):
            b1, b2 = g["betas"]
            for pi, p in enumerate(g["params"]):
                if p.grad is None:
                    continue
                w, group = local_and_group(p)
                grad, _ = local_and_group(p.grad)
                if grad.is_sparse:
                    raise RuntimeError("ProjAdamW does not support sparse gradients")
                st = self.state[p]
                kind = g["kind"]
                if kind == "projected":
                    side = choose_side(p.shape)  # DTensor.shape is the global shape
                    self._step_projected(p, w, grad, st, g, group, side, seed=g["seed"] + 7919 * gi + pi)
                    continue
                grad = grad.to(torch.float32)
                if kind == "lora_a" and "basis" in st:
                    grad = self._tally(p, grad, remove_cols(grad, st["basis"]))
                elif kind == "orthogonal" and "u_frozen" in st:
                    grad = self._confine(grad, st, group)
                if "exp_avg" not in st:
                    st["step"] = torch.tensor(0, dtype=torch.int64)
                    st["exp_avg"] = torch.zeros_like(grad)
                    st["exp_avg_sq"] = torch.zeros_like(grad)
                delta = _adam_direction(st, grad, b1, b2, g["eps"])
                if g["weight_decay"]:
                    delta.add_(w.to(torch.float32), alpha=g["weight_decay"])
                if kind == "lora_a" and "basis" in st:
                    delta = remove_cols(delta, st["basis"])
                elif kind == "orthogonal" and "u_frozen" in st:
                    delta = self._confine(delta, st, group)
                w.add_(delta.to(w.dtype), alpha=-g["lr"])
        return loss

    def _tally(self, p: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Count the energy of ``before`` and of ``after`` (its part off the basis) for ``memory_removed``; returns
        ``after``."""
        t = self._removal.setdefault(p, torch.zeros(2, dtype=torch.float64, device=before.device))
        t += torch.stack([before.square().sum(), after.square().sum()]).to(torch.float64)
        return after

    def memory_removed(self) -> dict[str, float]:
        """Parameter name -> the share of its gradient energy the task memory removed, over the steps taken so far
        (0 for a parameter without a basis). A collective under FSDP2: every rank must call it."""
        out = {}
        for name, p, g in self.named_params(("lora_a", "projected")):
            t = self._removal.get(p)
            if t is None:
                out[name] = 0.0
                continue
            replicated = g["kind"] == "projected" and choose_side(p.shape) == "left"  # R (n x r) on every rank
            t = t.clone() if replicated else all_reduce_sum(t.clone(), local_and_group(p)[1])
            out[name] = float(1 - t[1] / t[0]) if t[0] > 0 else 0.0
        return out

    @staticmethod
    def _confine(x: torch.Tensor, st: dict, group: ProcessGroup) -> torch.Tensor:
        """(I - U U^T) x (I - V V^T) for a row shard x (m_i x n)."""
        x = remove_rows(x, st["u_frozen"], group)
        return remove_cols(x, st["v_frozen"])

    def _step_projected(self, p, w, grad, st, g, group, side: str, seed: int) -> None:
        kw = {"oversample": g["oversample"], "power_iters": g["power_iters"]}
        b1, b2 = g["betas"]
        if "proj" not in st:
            st["step"] = torch.tensor(0, dtype=torch.int64)
            st["last_refresh"] = torch.tensor(0, dtype=torch.int64)
            st["n_refresh"] = torch.tensor(1, dtype=torch.int64)
            st["proj"] = compute_projection(grad, g["rank"], side, group, g["proj_method"], seed=seed, **kw)
            r = project(grad, st["proj"], side, group)
            st["exp_avg"] = torch.zeros_like(r)
            st["exp_avg_sq"] = torch.zeros_like(r)
        else:
            due = int(st["step"].item()) - int(st["last_refresh"].item()) >= g["update_gap"]
            r = None if due and g["refresh"] == "fixed" else project(grad, st["proj"], side, group)
            if due and (r is None or outside_energy(grad, r, side, group) > g["adaptive_threshold"]):
                n = int(st["n_refresh"].item())
                st["proj"] = compute_projection(
                    grad, g["rank"], side, group, g["proj_method"], seed=seed + 104729 * n, **kw
                )
                st["last_refresh"].fill_(int(st["step"].item()))
                st["n_refresh"] += 1
                r = project(grad, st["proj"], side, group)
        basis = st.get("basis")
        kept_sharded = group if side == "right" else None  # the kept axis is W's rows (sharded) only on the right side
        if basis is not None:
            r = self._tally(p, r, remove_rows(r, basis, kept_sharded))
        direction = _adam_direction(st, r, b1, b2, g["eps"])
        if basis is not None:
            direction = remove_rows(direction, basis, kept_sharded)
        update = project_back(direction, st["proj"], side).mul_(g["scale"])
        if g["weight_decay"]:
            decay = w.to(torch.float32) * g["weight_decay"]
            if basis is not None:
                decay = remove_rows(decay, basis, group) if side == "right" else remove_cols(decay, basis)
            update.add_(decay)
        w.add_(update.to(w.dtype), alpha=-g["lr"])

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but every state tensor keeps its saved dtype (torch casts floating state to the param dtype,
        which would round a float32 projection or moment held for a bf16 weight)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            local, _ = local_and_group(p)
            for k, v in saved.items():
                if torch.is_tensor(v):
                    self.state[p][k] = v.detach().clone().to(device=local.device if v.ndim else v.device)


def state_bytes(opt: Optimizer) -> int:
    """Bytes of tensor state held by this rank's optimizer."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
