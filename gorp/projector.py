"""Low-rank gradient projector (GaLore's building block), exact on FSDP2 row shards.

For a weight W (m x n) with gradient G and rank r:

* ``side="right"`` (m >= n): P = top-r right singular vectors of G, stored as (r x n); R = G P^T is (m x r).
* ``side="left"``  (m <  n): P = top-r left singular vectors of G, stored as (m x r); R = P^T G is (r x n).

Everything below works on a *row shard* G_i (m_i x n) of G plus the process group the rows are spread over, so that one
code path serves a plain tensor (group None) and FSDP2's DTensor. The singular vectors are computed from pieces that can
be summed across shards, so the sharded result equals the single-process one:

* right side: the Gram matrix G^T G = sum_i G_i^T G_i (n x n, all-reduced; n <= m), eigen-decomposed in float64;
* left side: G itself is gathered (m x n, m < n: cheaper than the n x n Gram) and the same routine runs on G^T;
* ``method="randomized"``: a randomized range finder with power iterations (Halko et al. 2011) on the same
  all-reducible products, G^T (G Omega) and (G Q)^T (G Q), with Omega drawn from a seeded generator identical on every
  rank. The passes over G run in float32; the small Rayleigh-Ritz problem in float64.

What the randomized refresh gives up (``OVERSAMPLE`` = 24, ``POWER_ITERS`` = 2, ProjAdamW's default; measured on 120
real SmolLM2-135M gate_proj gradients by ``benchmarks/projector_accuracy.py``): it keeps at least 99.99% of the energy
of the exact float64 rank-8 basis (||G P^T||^2 against sum_i<8 s_i^2). Its largest principal angle to that basis is
small where the rank-8 subspace is well defined and grows where s_9 / s_8 -> 1 (real gradients have s_9 / s_8 up to
0.99: the exact "top 8" is then itself a coin toss between directions 8 and 9); the figures are in
``benchmarks/results/optimizer_step_accuracy.txt`` and ``tests/test_projector.py`` pins them. It costs 7 float32 passes
over G (m x n) with n x 32 blocks, against the exact path's float64 n x n Gram (m n^2) and its eigendecomposition
(~9 n^3): about a tenth of the time for gate_proj (1536 x 576).

Singular vectors are defined up to sign; every column is flipped so that its largest-magnitude entry is positive,
which makes the result deterministic across processes.

The projected gradient is handled in a *canonical orientation* (``Rc``, d x r), whose rows index the full-size axis that
the projection keeps (rows of W for the right side, columns of W for the left side). The task-subspace memory lives on
that axis too (see :mod:`gorp.memory`).
"""

from __future__ import annotations

from typing import Literal

import torch

from gorp.distributed import ProcessGroup, all_reduce_sum, gather_rows, row_offset

Side = Literal["right", "left"]
Method = Literal["svd", "randomized"]
SIDES = ("right", "left")
METHODS = ("svd", "randomized")
OVERSAMPLE = 24  # randomized finder defaults: sketch width r + 24, two power iterations (accuracy: module docstring)
POWER_ITERS = 2


def choose_side(shape: torch.Size | tuple[int, ...]) -> Side:
    """GaLore's rule: project the shorter axis."""
    if len(shape) != 2:
        raise ValueError(f"the projector works on 2-D weights, got shape {tuple(shape)}")
    m, n = shape
    return "right" if m >= n else "left"


def canonical_signs(vecs: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    idx = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs[signs == 0] = 1
    return vecs * signs


def top_right_singular(
    g_local: torch.Tensor,
    rank: int,
    group: ProcessGroup = None,
    method: Method = "svd",
    *,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` right singular vectors (n x r, float32) and singular values (r, float64) of G.

    G is the vertical stack of ``g_local`` over ``group`` (just ``g_local`` when group is None).
    """
    n = g_local.shape[1]
    r = min(rank, n)
    if method == "svd":
        g = g_local.to(torch.float64)
        gram = all_reduce_sum(g.T @ g, group)  # (n, n) = sum_i G_i^T G_i
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        order = torch.argsort(evals, descending=True)[:r]
        vecs, vals = evecs[:, order], evals[order]
    elif method == "randomized":
        vecs, vals = _range_finder(g_local, r, group, oversample, power_iters, seed)
    else:
        raise ValueError(f"unknown projection method {method!r}; expected one of {METHODS}")
    sigma = vals.clamp_min(0).sqrt()
    return canonical_signs(vecs).to(torch.float32), sigma


def _range_finder(
    g_local: torch.Tensor, r: int, group: ProcessGroup, oversample: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of G^T G from a k = r + oversample column sketch refined by ``power_iters`` power iterations.

    The passes over G run in float32 (they dominate the cost: 2 + 2 * power_iters + 1 products of G with n x k
    blocks); the k x k Rayleigh-Ritz problem is solved in float64. Returns (n x r float64 vectors, r eigenvalues).
    """
    n = g_local.shape[1]
    k = min(n, r + oversample)
    g = g_local.to(torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, dtype=torch.float32).to(g.device)
    y = all_reduce_sum(g.T @ (g @ omega), group)  # (n, k): G^T G Omega
    for _ in range(power_iters):
        q = torch.linalg.qr(y).Q
        y = all_reduce_sum(g.T @ (g @ q), group)
    q = torch.linalg.qr(y).Q  # (n, k), spans the top right-singular subspace
    b = g @ q  # (m_i, k)
    small = all_reduce_sum(b.T @ b, group).to(torch.float64)  # (k, k) = Q^T G^T G Q
    evals, w = torch.linalg.eigh(small)
    order = torch.argsort(evals, descending=True)[:r]
    return q.to(torch.float64) @ w[:, order], evals[order]


def compute_projection(
    g_local: torch.Tensor,
    rank: int,
    side: Side,
    group: ProcessGroup = None,
    method: Method = "svd",
    **kwargs,
) -> torch.Tensor:
    """The projection for this rank: (r x n) for the right side, this rank's rows (m_i x r) of U for the left side."""
    if side == "right":
        v, _ = top_right_singular(g_local, rank, group, method, **kwargs)
        return v.T.contiguous()  # (r, n), replicated
    if side == "left":
        g_full = gather_rows(g_local, group)  # (m, n)
        u, _ = top_right_singular(g_full.T, rank, None, method, **kwargs)  # right vectors of G^T = left vectors of G
        start = row_offset(g_local, group)
        return u[start : start + g_local.shape[0]].contiguous()  # (m_i, r)
    raise ValueError(f"unknown projection side {side!r}; expected one of {SIDES}")


def project(g_local: torch.Tensor, p_local: torch.Tensor, side: Side, group: ProcessGroup = None) -> torch.Tensor:
    """Projected gradient in canonical orientation: (m_i x r) for the right side, (n x r) for the left side."""
    g = g_local.to(p_local.dtype)
    if side == "right":
        return g @ p_local.T  # (m_i, n) @ (n, r)
    return all_reduce_sum(p_local.T @ g, group).T  # ((r, m_i) @ (m_i, n)).T summed over shards -> (n, r)


def project_back(n_canon: torch.Tensor, p_local: torch.Tensor, side: Side) -> torch.Tensor:
    """Full-size update for this rank's rows (m_i x n) from a canonical low-rank one."""
    if side == "right":
        return n_canon @ p_local  # (m_i, r) @ (r, n)
    return p_local @ n_canon.T  # (m_i, r) @ (r, n)


def outside_energy(g_local: torch.Tensor, r_canon: torch.Tensor, side: Side, group: ProcessGroup = None) -> float:
    """Share of ||G||^2 outside the current subspace: 1 - ||R||^2 / ||G||^2 (P has orthonormal rows/columns)."""
    sq = torch.stack([g_local.to(torch.float64).square().sum(), r_canon.to(torch.float64).square().sum()])
    if side == "right":
        all_reduce_sum(sq, group)  # both G and R are row-sharded
    else:
        sq[0] = all_reduce_sum(sq[:1].clone(), group)[0]  # R is already the full (replicated) projection
    total, inside = sq.tolist()
    return 0.0 if total == 0 else max(0.0, 1.0 - inside / total)
