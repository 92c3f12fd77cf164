"""ProjAdamW against an independent reference, its state-dict round trip, and its argument checks."""

from __future__ import annotations

import copy

import pytest
import torch

from gorp.methods import build_method
from gorp.optim import ProjAdamW, state_bytes
from tiny_models import tiny_llama


def reference_galore_adam(w0, grads, *, lr, rank, gap, scale, b1=0.9, b2=0.999, eps=1e-8, basis=None):
    """GaLore-Adam written out in float64: P from the SVD of G every `gap` steps; moments on R, not reset at refresh.

    `basis` (m x k, orthonormal) is removed from R and from the Adam direction (GORP's memory, right side only here).
    """
    w = w0.double().clone()
    basis = None if basis is None else basis.double()
    m = v = p = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            p = torch.linalg.svd(g, full_matrices=False).Vh[:rank]  # (r, n), m >= n
            # the documented sign convention: each vector's largest-magnitude entry is positive (the moments carry
            # over a refresh, so the sign of the new vectors matters)
            p = p * torch.sign(p.gather(1, p.abs().argmax(dim=1, keepdim=True)))
        r = g @ p.T
        if basis is not None:
            r = r - basis @ (basis.T @ r)
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if basis is not None:
            n = n - basis @ (basis.T @ n)
        w = w - lr * scale * (n @ p)
    return w


@pytest.mark.parametrize("with_basis", [False, True])
@pytest.mark.parametrize("proj_method", ["svd", "randomized"])  # randomized: sketch r + 24 >= n = 10, the whole space
def test_projected_steps_match_reference(with_basis, proj_method):
    torch.manual_seed(0)
    m_, n_ = 24, 10
    w = torch.nn.Parameter(torch.randn(m_, n_, dtype=torch.float64))  # float64: the 1e-6 check below is not rounding
    w0 = w.detach().clone()
    # gradients with a clear spectral gap so each refresh picks a well-defined subspace
    grads = []
    for _ in range(12):
        u = torch.linalg.qr(torch.randn(m_, n_)).Q
        vv = torch.linalg.qr(torch.randn(n_, n_)).Q
        grads.append((u * (0.5 ** torch.arange(n_, dtype=torch.float32))) @ vv.T)
    basis = torch.linalg.qr(torch.randn(m_, 3)).Q if with_basis else None
    group = {"kind": "projected", "params": [w], "names": ["w"], "proj_method": proj_method}
    opt = ProjAdamW([group], lr=0.01, rank=3, update_gap=5, scale=0.5)
    if with_basis:
        assert opt.set_basis({"w": basis}) == 1
    for g in grads:
        w.grad = g.double()
        opt.step()
    ref = reference_galore_adam(w0, grads, lr=0.01, rank=3, gap=5, scale=0.5, basis=basis)
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-5, atol=1e-6)
    assert int(opt.state[w]["n_refresh"]) == 3  # steps 1, 6, 11
    if with_basis:  # the whole update stayed out of span(basis)
        delta = w.detach().double() - w0.double()
        assert (basis.double().T @ delta).norm() / delta.norm() < 1e-6


def test_memory_removed_is_the_share_of_gradient_energy_inside_the_basis():
    """lora_a: the gradient's rows against S (n x k); projected (m > n, right side): the projected gradient R (m x r)
    against S (m x k); a parameter without a basis: nothing removed."""
    torch.manual_seed(0)
    a, w, free = (torch.nn.Parameter(torch.randn(*s, dtype=torch.float64)) for s in ((4, 12), (16, 6), (4, 12)))
    s_a, s_w = torch.linalg.qr(torch.randn(12, 5)).Q.double(), torch.linalg.qr(torch.randn(16, 3)).Q.double()
    opt = ProjAdamW(
        [
            {"kind": "lora_a", "params": [a, free], "names": ["a", "free"]},
            {"kind": "projected", "params": [w], "names": ["w"], "rank": 2, "update_gap": 100, "proj_method": "svd"},
        ]
    )
    assert opt.set_basis({"a": s_a, "w": s_w}) == 2
    inside = {"a": [0.0, 0.0], "w": [0.0, 0.0]}  # energy inside the basis, total energy
    for _ in range(3):
        for p in (a, w, free):
            p.grad = torch.randn_like(p)
        opt.step()
        r = w.grad @ opt.state[w]["proj"].T.double()  # the projection is fixed (update_gap > steps)
        for key, x in (("a", (a.grad @ s_a).square().sum()), ("w", (s_w.T @ r).square().sum())):
            inside[key][0] += float(x)
        inside["a"][1] += float(a.grad.square().sum())
        inside["w"][1] += float(r.square().sum())
    removed = opt.memory_removed()
    assert removed["free"] == 0.0
    for key in ("a", "w"):
        assert removed[key] == pytest.approx(inside[key][0] / inside[key][1], rel=1e-6)
        assert 0.05 < removed[key] < 0.95


def test_plain_group_matches_torch_adamw():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(7, 5))
    b = torch.nn.Parameter(a.detach().clone())
    mine = ProjAdamW([{"params": [a]}], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(6):
        g = torch.randn(7, 5)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _step(model, opt, batch):
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_continues_bit_for_bit():
    """Save mid-task, restore into a fresh model + optimizer: the next 5 steps equal the uninterrupted run exactly."""
    args = {"lora_dropout": 0.0, "update_gap": 3, "full_rank_lr": 1e-3, "proj_method": "randomized"}
    batches = _batches(10, seed=3)

    def fresh():
        method = build_method("gorp", **args)
        torch.manual_seed(0)
        model = method.setup_task(tiny_llama(seed=0), 0)
        return method, model, method.make_optimizer(model)

    method, model, opt = fresh()
    for b in batches[:5]:
        _step(model, opt, b)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert state_bytes(opt) > 0
    for b in batches[5:]:
        _step(model, opt, b)

    _, model2, opt2 = fresh()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for b in batches[5:]:
        _step(model2, opt2, b)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    for p, p2 in zip(opt.state, opt2.state, strict=True):
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[p2][key]), key


def test_load_state_dict_keeps_float32_state_for_bf16_weights():
    w = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = ProjAdamW([{"kind": "projected", "params": [w]}], rank=2)
    w.grad = torch.randn(8, 4, dtype=torch.bfloat16)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = ProjAdamW([{"kind": "projected", "params": [w]}], rank=2)
    opt2.load_state_dict(sd)
    assert opt2.state[w]["proj"].dtype == torch.float32
    assert torch.equal(opt2.state[w]["proj"], opt.state[w]["proj"])


@pytest.mark.parametrize(
    "group, match",
    [
        ({"kind": "projected", "rank": 0}, "rank must be a positive integer"),
        ({"kind": "projected", "rank": -3}, "rank must be a positive integer"),
        ({"kind": "projected", "update_gap": 0}, "update_gap"),
        ({"kind": "projected", "proj_method": "qr"}, "unknown proj_method 'qr'"),
        ({"kind": "projected", "refresh": "sometimes"}, "unknown refresh"),
        ({"kind": "mystery"}, "unknown kind 'mystery'"),
        ({"lr": -1.0}, "invalid learning rate"),
        ({"betas": (0.9, 1.0)}, "invalid betas"),
        ({"rnak": 4}, "unknown keys"),
    ],
)
def test_bad_group_arguments_name_the_problem(group, match):
    with pytest.raises(ValueError, match=match):
        ProjAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 3))], **group}])


def test_bad_method_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown method 'gorpp'"):
        build_method("gorpp")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        build_method("gorp", rank=0)
    with pytest.raises(ValueError, match="lora_r must be a positive integer"):
        build_method("lora", lora_r=-1)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        build_method("galore", rnak=4)
    with pytest.raises(ValueError, match="'mlp.not_there'"):
        build_method("gorp", full_rank_targets=["mlp.not_there"]).setup_task(tiny_llama(), 0)
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        ProjAdamW([torch.nn.Parameter(torch.randn(2, 2))], rnak=2)


def test_adaptive_refresh_follows_the_gradient_subspace():
    """Adaptive mode refreshes only when the share of gradient energy outside the subspace exceeds the threshold."""
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = ProjAdamW(
        [{"kind": "projected", "params": [w]}], rank=2, update_gap=1, refresh="adaptive", adaptive_threshold=0.5
    )
    u = torch.linalg.qr(torch.randn(16, 8)).Q
    v = torch.linalg.qr(torch.randn(8, 8)).Q
    stay = (u[:, :2] * torch.tensor([2.0, 1.0])) @ v[:, :2].T  # rank 2: always inside the first subspace
    for _ in range(5):
        w.grad = stay.clone()
        opt.step()
    assert int(opt.state[w]["n_refresh"]) == 1
    move = (u[:, 2:4] * torch.tensor([2.0, 1.0])) @ v[:, 2:4].T  # orthogonal to it: all energy outside
    w.grad = move
    opt.step()
    assert int(opt.state[w]["n_refresh"]) == 2
    w.grad = move.clone()
    opt.step()
    assert int(opt.state[w]["n_refresh"]) == 2  # the new subspace holds it
