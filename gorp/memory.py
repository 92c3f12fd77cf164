"""Task-subspace memory: the directions earlier tasks relied on, one orthonormal basis per trained matrix.

After a task, the final Adam first moment M of every projected weight and every LoRA A (in the canonical orientation of
:meth:`gorp.optim.ProjAdamW.canonical_moment`, d x c) is decomposed, M = U diag(s) V^T; the leading columns of U
that hold ``threshold`` (default 90%) of the energy sum(s^2) are orthogonalized against the stored basis and appended
to it, capped at d columns. While later tasks train, :class:`~gorp.optim.ProjAdamW` removes the components of
gradients and updates inside these bases.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gorp.projector import canonical_signs

# A new direction whose residual after removing the stored basis is below this norm is already (numerically) stored.
_RESIDUAL_TOL = 1e-3


def leading_directions(m: torch.Tensor, threshold: float) -> torch.Tensor:
    """Leading left singular vectors of ``m`` (d x c) holding ``threshold`` of its energy (d x k, float32)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
    u, s, _ = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    energy = s.square()
    total = energy.sum()
    if total <= 0:
        return m.new_zeros((m.shape[0], 0), dtype=torch.float32)
    cum = torch.cumsum(energy, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype) - 1e-12).item()) + 1
    return canonical_signs(u[:, : min(k, u.shape[1])]).to(torch.float32)


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
    """Per-parameter bases (d x k) of earlier tasks' subspaces, keyed by parameter (or module) name."""

    def __init__(self, threshold: float = 0.9, bases: dict[str, torch.Tensor] | None = None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.bases: dict[str, torch.Tensor] = dict(bases or {})

    def __len__(self) -> int:
        return len(self.bases)

    def dims(self) -> dict[str, int]:
        """Number of stored directions per matrix."""
        return {k: int(v.shape[1]) for k, v in self.bases.items()}

    def update(self, name: str, moment: torch.Tensor) -> int:
        """Fold one matrix's final first moment (d x c) into its basis; returns the number of directions added."""
        before = self.bases[name].shape[1] if name in self.bases else 0
        self.bases[name] = append_orthonormal(self.bases.get(name), leading_directions(moment, self.threshold))
        return self.bases[name].shape[1] - before

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.bases.items()}, str(path), metadata={"threshold": str(self.threshold)}
        )

    @classmethod
    def load(cls, path: str | Path) -> TaskMemory:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            threshold = float((f.metadata() or {}).get("threshold", 0.9))
        return cls(threshold, load_file(str(path)))
