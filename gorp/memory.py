"""Task-subspace memory: the directions earlier tasks relied on, one orthonormal basis per trained matrix.

After a task, the final Adam first moment M of every projected weight and every LoRA A (in the canonical orientation of
:meth:`gorp.optim.ProjAdamW.canonical_moment`, d x c) is folded into that matrix's basis S (d x k, capped at d columns)
by one of two growth rules (``rule``):

``energy`` (the default): M = U diag(s) V^T; the leading columns of U that hold ``threshold`` (90%) of M's own
    energy sum(s^2) are orthogonalized against S and whatever is not yet in S (residual norm above 1e-3) is appended.
    Given a moment that S already explains mostly, it adds directions the GPM rule would not.
``gpm``: the growth rule of Gradient Projection Memory (Saha et al. 2021), as in the released GORP code. With
    total = ||M||_F^2 and projected = ||S^T M||_F^2, nothing is added when projected / total >= threshold; otherwise
    the residual R = M - S S^T M is decomposed and its fewest leading left singular vectors r_1..r_k are added such
    that (projected + s_1^2 + ... + s_k^2) / total >= threshold. On the first task (S empty) this keeps the smallest k
    whose cumulative energy reaches the threshold, so a task always keeps at least one direction (the released code
    keeps the count strictly below the threshold, which is 0 when the top direction alone holds 90%).

Inside GORP's own training the two rules store the same memory: :class:`~gorp.optim.ProjAdamW` removes S from every
gradient before it enters the moments, so a task's final M lies outside S (to ~1e-7 relative), the GPM rule's
"already explained" share is 0, and both keep the same leading directions of M
(``tests/test_memory_rules.py::test_inside_gorp_the_gpm_and_energy_rules_store_the_same_memory``). They differ only for
a moment that overlaps S, e.g. one computed without the projection; ``energy`` stays the default.

While later tasks train, :class:`~gorp.optim.ProjAdamW` removes the components of gradients and updates inside these
bases.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gorp.projector import canonical_signs

# A new direction whose residual after removing the stored basis is below this norm is already (numerically) stored.
_RESIDUAL_TOL = 1e-3
RULES = ("energy", "gpm")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"memory_rule must be one of {RULES} (see gorp.memory), got {rule!r}")
    return rule


def _smallest_count(cum: torch.Tensor, threshold: float) -> int:
    """The smallest k >= 1 with cum[k-1] >= threshold (len(cum) when none reaches it: rounding at threshold 1)."""
    return min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype) - 1e-12).item()) + 1, len(cum))


def leading_directions(m: torch.Tensor, threshold: float) -> torch.Tensor:
    """Leading left singular vectors of ``m`` (d x c) holding ``threshold`` of its energy (d x k, float32)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
    u, s, _ = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    energy = s.square()
    total = energy.sum()
    if total <= 0:
        return m.new_zeros((m.shape[0], 0), dtype=torch.float32)
    k = _smallest_count(torch.cumsum(energy, 0) / total, threshold)
    return canonical_signs(u[:, :k]).to(torch.float32)


def gpm_directions(basis: torch.Tensor | None, m: torch.Tensor, threshold: float) -> torch.Tensor:
    """The residual directions (d x k, float32, orthogonal to ``basis``) that the GPM rule adds for moment ``m``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
    x = m.to(torch.float64)
    none = m.new_zeros((m.shape[0], 0), dtype=torch.float32)
    total = x.square().sum()
    if total <= 0:
        return none
    projected = torch.zeros((), dtype=torch.float64)
    if basis is not None and basis.shape[1] > 0:
        b = basis.to(torch.float64)
        inside = b.T @ x
        projected = inside.square().sum()
        x = x - b @ inside
    if projected / total >= threshold:
        return none
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    u = u[:, s > s[0] * 1e-10]  # directions the residual really has (the rest are arbitrary, possibly inside S)
    cum = (projected + torch.cumsum(s[: u.shape[1]].square(), 0)) / total
    return canonical_signs(u[:, : _smallest_count(cum, threshold)]).to(torch.float32)


def append_orthonormal(basis: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """[basis, new'] where new' spans the part of span(new) orthogonal to span(basis); at most d columns in all."""
    d = new.shape[0]
    if basis is None or basis.shape[1] == 0:
        basis = new.new_zeros((d, 0), dtype=torch.float32)
    if basis.shape[0] != d:
        raise ValueError(f"basis has {basis.shape[0]} rows but the new directions have {d}")
    b = basis.to(torch.float64)
    x = new.to(torch.float64)
    for _ in range(2):  # classical Gram-Schmidt, twice is enough (Giraud et al. 2005)
        x = x - b @ (b.T @ x)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    room = d - b.shape[1]
    keep = u[:, s > _RESIDUAL_TOL][:, :room]
    return torch.cat([b, keep], dim=1).to(torch.float32).contiguous()


class TaskMemory:
    """Per-parameter bases (d x k) of earlier tasks' subspaces, keyed by parameter (or module) name.

    ``rule`` is the growth rule, ``"energy"`` (default) or ``"gpm"`` (see the module docstring).
    """

    def __init__(self, threshold: float = 0.9, bases: dict[str, torch.Tensor] | None = None, rule: str = "energy"):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.rule = check_rule(rule)
        self.bases: dict[str, torch.Tensor] = dict(bases or {})

    def __len__(self) -> int:
        return len(self.bases)

    def dims(self) -> dict[str, int]:
        """Number of stored directions per matrix."""
        return {k: int(v.shape[1]) for k, v in self.bases.items()}

    def update(self, name: str, moment: torch.Tensor) -> int:
        """Fold one matrix's final first moment (d x c) into its basis; returns the number of directions added."""
        basis = self.bases.get(name)
        before = basis.shape[1] if basis is not None else 0
        if self.rule == "gpm":
            new = gpm_directions(basis, moment, self.threshold)
        else:
            new = leading_directions(moment, self.threshold)
        self.bases[name] = append_orthonormal(basis, new)
        return self.bases[name].shape[1] - before

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threshold": str(self.threshold), "rule": self.rule}
        save_file({k: v.contiguous() for k, v in self.bases.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> TaskMemory:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return cls(float(meta.get("threshold", 0.9)), load_file(str(path)), meta.get("rule", "energy"))
