"""Wide projected weights (m < n: LLaMA's mlp.down_proj, T5 attention whose inner size is below d_model) with task
memory and weight decay, against a reference written here in plain torch math.

For a wide W the projector keeps the left singular vectors (P is m x r, R = P^T G is r x n) and the task memory lives
on W's input axis n: R, the Adam direction and the weight decay all lose their components inside the stored basis S
(n x k), X <- X - (X S) S^T. The model trains two tasks through the gorp method (down_proj as the full-rank target); the
reference replays the same gradients with its own SVD, Adam, basis removal, decay and memory.
"""

from __future__ import annotations

import pytest
import torch

from gorp.methods import build_method
from tiny_models import tiny_llama

KEY = "model.layers.0.mlp.down_proj.weight"  # (hidden 32) x (intermediate 64): wide
ARGS = {
    "lora_dropout": 0.0,
    "full_rank_targets": ["mlp.down_proj"],
    "full_rank_lr": 1e-2,
    "lr": 1e-2,
    "rank": 4,
    "update_gap": 3,
    "scale": 0.5,
    "weight_decay": 0.5,
}
STEPS = 7  # per task: refreshes at steps 0, 3, 6


def batch(task: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * task + step)
    ids = torch.randint(0, 128, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.fixture(scope="module")
def trained():
    return train_with_method()


def train_with_method():
    """Two tasks through gorp; per task the weight at its start, and the gradient and the weight after every step; the
    memory of the wide weight after each task."""
    method = build_method("gorp", **ARGS)
    model = tiny_llama(seed=0)
    tasks, memories = [], []
    for task in range(2):
        torch.manual_seed(task)
        model = method.setup_task(model, task)
        opt = method.make_optimizer(model)
        w = dict(model.named_parameters())[f"base_model.model.{KEY}"]
        start, grads, after = w.detach().clone().double(), [], []
        for step in range(STEPS):
            model(**batch(task, step)).loss.backward()
            grads.append(w.grad.detach().clone().double())
            opt.step()
            opt.zero_grad(set_to_none=True)
            after.append(w.detach().clone().double())
        tasks.append((start, grads, after))
        method.end_task(model, opt)
        memories.append(method.memory.bases[KEY].double().clone())
        model = method.finalize(model)
    return tasks, memories


# ---------------------------------------------------------------- the reference: plain torch math
def top_left_vectors(g: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r left singular vectors of g, each column signed so that its largest-magnitude entry is positive."""
    u = torch.linalg.svd(g, full_matrices=False).U[:, :r]
    big = u.abs().argmax(dim=0)
    return u * torch.sign(u[big, torch.arange(r)])


def off(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The rows of x (. x n) without their components inside span(s) (n x k)."""
    return x if s is None else x - (x @ s) @ s.T


def reference_task(w: torch.Tensor, grads: list[torch.Tensor], s: torch.Tensor | None):
    """One task of AdamW on the projected gradient with the basis and decay removals; returns the weight after every
    step and the final first moment (n x r, the axis the memory lives on)."""
    lr, wd, scale, r, gap = ARGS["full_rank_lr"], ARGS["weight_decay"], ARGS["scale"], ARGS["rank"], ARGS["update_gap"]
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = v = p = None
    out = []
    for t, g in enumerate(grads):
        if t % gap == 0:
            p = top_left_vectors(g, r)  # m x r
        rg = off(p.T @ g, s)  # r x n
        m = (1 - b1) * rg if m is None else b1 * m + (1 - b1) * rg
        v = (1 - b2) * rg**2 if v is None else b2 * v + (1 - b2) * rg**2
        direction = off((m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + eps), s)
        w = w - lr * (scale * (p @ direction) + wd * off(w, s))
        out.append(w)
    return out, m.T


def grow(s: torch.Tensor | None, moment: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """The energy rule: the moment's leading left singular vectors holding the threshold, appended orthonormally."""
    u, sv, _ = torch.linalg.svd(moment, full_matrices=False)
    cum = torch.cumsum(sv**2, 0) / (sv**2).sum()
    new = u[:, : int((cum < threshold - 1e-12).sum()) + 1]
    if s is None:
        return new
    q = torch.linalg.qr(torch.cat([s, new - s @ (s.T @ new)], 1)).Q
    return q


def proj(s: torch.Tensor) -> torch.Tensor:
    return s @ s.T


def test_wide_projected_weight_with_memory_and_weight_decay_matches_reference(trained):
    tasks, memories = trained
    s = None
    for task, (start, grads, got) in enumerate(tasks):
        want, moment = reference_task(start, grads, s)
        for t in range(STEPS):
            err = (got[t] - want[t]).norm() / (want[t] - start).norm()
            assert err < 1e-4, f"task {task} step {t}: relative difference {err:.2e}"
        s = grow(s, moment)
        assert s.shape[0] == 64 and memories[task].shape == s.shape  # the memory lives on the input axis (n = 64)
        torch.testing.assert_close(proj(memories[task]), proj(s), rtol=0, atol=1e-5)
    assert s.shape[1] > memories[0].shape[1]  # task 2 added directions


def test_wide_task2_updates_and_decay_stay_off_task1_basis(trained):
    """Every task-2 update of the wide weight, weight decay included, leaves W S unchanged (S: task 1's basis)."""
    tasks, memories = trained
    s = memories[0]
    start, _, after = tasks[1]
    ws = [start] + after
    for before, now in zip(ws, ws[1:], strict=False):
        delta = now - before
        assert (delta @ s).norm() <= 1e-6 * delta.norm(), "a task-2 update entered task 1's subspace"
    assert (ws[-1] - ws[0]).norm() > 1e-3  # task 2 did train the weight
    assert (ws[0] @ s).norm() > 0.1  # and W has components in S that an unrestricted decay would shrink
