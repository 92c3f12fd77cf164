"""The memory growth rule as a choice (energy / GPM), and new adapters started off the stored basis, on hand-made
matrices and the tiny model."""

from __future__ import annotations

import pytest
import torch

from gorp.memory import TaskMemory, gpm_directions
from gorp.methods import build_method
from gorp.methods.base import ContinualMethod, lora_pairs
from tiny_models import tiny_llama

E = torch.eye(20, dtype=torch.float64)
BASIS = E[:, :6]  # a stored 6-direction basis: e0..e5


def moment(columns: list[torch.Tensor], sv: list[float]) -> torch.Tensor:
    """d x c with orthonormal left vectors ``columns``, singular values ``sv`` and right vectors e_j."""
    return torch.stack([s * c for s, c in zip(sv, columns, strict=True)], 1)


def mostly_inside(share: float = 0.95) -> torch.Tensor:
    """A moment whose 4 directions each hold ``share`` of their energy inside BASIS: u_j ~ e_j + e_{6+j}."""
    cols = [share**0.5 * E[:, j] + (1 - share) ** 0.5 * E[:, 6 + j] for j in range(4)]
    return moment(cols, [3.0, 2.0, 1.5, 1.0])  # energies 9, 4, 2.25, 1 of 16.25


def grow(rule: str, m: torch.Tensor, threshold: float = 0.9, basis: torch.Tensor | None = BASIS) -> TaskMemory:
    mem = TaskMemory(threshold, {} if basis is None else {"w": basis.float()}, rule=rule)
    mem.update("w", m)
    return mem


def test_gpm_adds_nothing_for_a_moment_mostly_inside_the_basis_where_energy_adds_three():
    m = mostly_inside()  # 95% of its energy inside the basis
    assert grow("gpm", m).dims() == {"w": 6}
    # the energy rule keeps 3 leading directions (55%, 80%, 94% of m's own energy) and each has a 0.22 residual
    assert grow("energy", m).dims() == {"w": 9}


def test_gpm_adds_the_fewest_residual_directions_that_reach_the_threshold():
    m = mostly_inside()
    # at 0.97: projected 0.95 * 16.25 = 15.44 < 15.76; residual energies 0.45, 0.2, ...: one (e6) reaches it
    mem = grow("gpm", m, 0.97)
    torch.testing.assert_close(mem.bases["w"][:, 6].double(), E[:, 6], rtol=0, atol=1e-6)
    assert mem.dims() == {"w": 7}
    # a moment outside the basis: 3 e6, 2 e7, 1 e8 (+ 0.1 e0 inside): energies 9, 4, 1 (+ 0.01) of 14.01
    out = moment([E[:, 6], E[:, 7], E[:, 8], E[:, 0]], [3.0, 2.0, 1.0, 0.1])
    new = gpm_directions(BASIS.float(), out, 0.9).double()  # (0.01 + 9 + 4) / 14.01 = 0.929 >= 0.9: two
    assert new.shape == (20, 2)
    torch.testing.assert_close(new @ new.T, E[:, 6:8] @ E[:, 6:8].T, rtol=0, atol=1e-6)
    assert grow("gpm", out, 0.95).dims() == {"w": 9}  # 0.929 < 0.95 <= 1.0: three
    b = grow("gpm", out, 0.95).bases["w"].double()
    torch.testing.assert_close(b.T @ b, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-6)


def test_gpm_ranks_the_residual_not_the_moment():
    """The moment's top direction is 95% inside the basis (residual energy 0.45 along e6), its second lies outside
    (energy 1 along e7): GPM adds e7, the residual direction that counts, not what is left of the moment's top one."""
    m = moment([0.95**0.5 * E[:, 0] + 0.05**0.5 * E[:, 6], E[:, 7]], [3.0, 1.0])  # projected 8.55 of 10
    new = gpm_directions(BASIS.float(), m, 0.9).double()  # 8.55 + 1 >= 9: one
    assert new.shape == (20, 1)
    torch.testing.assert_close(new[:, 0], E[:, 7], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["gpm", "energy"])
def test_first_task_keeps_at_least_one_direction(rule):
    # the top direction alone holds 95%: "the count strictly below 0.9" (the released code) would keep 0
    assert grow(rule, moment([E[:, 3], E[:, 4]], [0.95**0.5, 0.05**0.5]), basis=None).dims() == {"w": 1}
    # 60%, 95%: the smallest count that reaches 90% is 2 (strictly below: 1)
    m = moment([E[:, 3], E[:, 4], E[:, 5]], [0.6**0.5, 0.35**0.5, 0.05**0.5])
    mem = grow(rule, m, basis=None)
    assert mem.dims() == {"w": 2}
    torch.testing.assert_close(mem.bases["w"].double() @ mem.bases["w"].double().T, E[:, 3:5] @ E[:, 3:5].T)


def test_rule_is_validated_and_carried_through_save_and_load(tmp_path):
    with pytest.raises(ValueError, match=r"memory_rule must be one of \('energy', 'gpm'\).*'pca'"):
        build_method("gorp", memory_rule="pca")
    with pytest.raises(ValueError, match="memory_rule must be one of"):
        TaskMemory(rule="pca")
    with pytest.raises(ValueError, match=r"adapter_init must be one of \('kaiming', 'orthogonal'\)"):
        build_method("gorp", adapter_init="zeros")
    assert build_method("gorp").memory.rule == "energy" and build_method("gorp").args.adapter_init == "orthogonal"
    fresh = build_method("gorp", memory_rule="gpm")
    fresh.memory.bases["w"] = BASIS.float()
    assert fresh.memory.update("w", mostly_inside()) == 0  # the method's memory grows by the rule it was given

    mem = grow("gpm", mostly_inside(), 0.97)
    mem.save(tmp_path / "m.safetensors")
    back = TaskMemory.load(tmp_path / "m.safetensors")
    assert back.rule == "gpm" and back.threshold == 0.97 and back.dims() == mem.dims()

    method = build_method("gorp", memory_rule="gpm", adapter_init="orthogonal")
    method.memory.bases["w"] = BASIS.float()
    method.save(tmp_path / "stage")
    loaded = ContinualMethod.load(tmp_path / "stage")
    assert loaded.memory.rule == "gpm" and loaded.args.adapter_init == "orthogonal"
    assert loaded.memory.update("w", mostly_inside()) == 0  # the loaded memory grows by the GPM rule


# ---------------------------------------------------------------- new adapters off the stored basis
def batches(task: int, n: int):
    g = torch.Generator().manual_seed(10 + task)
    for _ in range(n):
        ids = torch.randint(0, 128, (4, 12), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


ARGS = {"lora_dropout": 0.0, "lr": 1e-2, "full_rank_lr": 1e-2, "rank": 4}


@pytest.fixture(scope="module")
def task1() -> tuple[dict[str, torch.Tensor], TaskMemory]:
    """Task 1 trained and merged (the adapter init does not matter yet: the memory is empty): weights and memory."""
    method = build_method("gorp", **ARGS)
    torch.manual_seed(0)
    model = method.setup_task(tiny_llama(seed=0), 0)
    opt = method.make_optimizer(model)
    for b in batches(0, 4):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    method.end_task(model, opt)
    return method.finalize(model).state_dict(), method.memory


def task2(task1, adapter_init: str):
    """Task 2 set up after task 1: (model, optimizer, {module: (A, B, stored LoRA A basis S)})."""
    weights, memory = task1
    method = build_method("gorp", **ARGS, adapter_init=adapter_init)
    method.memory = memory
    model = tiny_llama(seed=0)
    model.load_state_dict(weights)
    torch.manual_seed(1)
    model = method.setup_task(model, 1)
    pairs = {m: (a, b, memory.bases[f"{m}.lora_A"]) for m, (a, b) in lora_pairs(model).items()}
    assert len(pairs) == 4 and all(s.shape[1] > 0 for _, _, s in pairs.values())
    return model, method.make_optimizer(model), pairs


def kaiming_norms() -> dict[str, float]:
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    model = build_method("gorp").setup_task(model, 1)
    return {m: float(a.detach().norm()) for m, (a, _) in lora_pairs(model).items()}


@pytest.mark.parametrize("adapter_init", ["orthogonal", "kaiming"])
def test_new_adapter_and_its_updates_stay_off_the_stored_basis(task1, adapter_init):
    model, opt, pairs = task2(task1, adapter_init)
    inside = {m: float((a.detach() @ s).norm()) for m, (a, _, s) in pairs.items()}
    if adapter_init == "kaiming":  # the hole: a fresh random A reads the stored input directions
        assert min(inside.values()) > 0.1
    else:
        assert max(inside.values()) <= 1e-6
        for m, norm in kaiming_norms().items():  # the same draw, projected and rescaled to its Kaiming norm
            assert float(pairs[m][0].detach().norm()) == pytest.approx(norm, rel=1e-5)
    for step, b in enumerate(batches(1, 3)):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m, (a, b_, s) in pairs.items():
            ba = b_.detach() @ a.detach()  # the adapter's product (scaling aside), non-zero from the first step on
            assert ba.norm() > 1e-4
            rel = float((ba @ s).norm() / ba.norm())
            if adapter_init == "orthogonal":
                assert rel <= 1e-6 and float((a.detach() @ s).norm()) <= 1e-6, (m, step, rel)
            else:
                assert rel > 0.05, (m, step, rel)


# ---------------------------------------------------------------- the two rules inside GORP's own training
def two_tasks(rule: str) -> TaskMemory:
    method = build_method("gorp", **ARGS, memory_rule=rule)
    model = tiny_llama(seed=0)
    for task in range(2):
        torch.manual_seed(task)
        model = method.setup_task(model, task)
        opt = method.make_optimizer(model)
        for b in batches(task, 4):
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if task == 1:  # ProjAdamW removed the stored basis from every gradient: the moments hold nothing of it
            for name, p, g in opt.named_params(("lora_a", "projected")):
                m, s = opt.canonical_moment(p, g), method.memory.bases[name]
                assert float((s.T @ m).norm() / m.norm()) <= 1e-5, name
        method.end_task(model, opt)
        model = method.finalize(model)
    return method.memory


def test_inside_gorp_the_gpm_and_energy_rules_store_the_same_memory():
    """A task's final moments lie outside the stored basis (projected out during training), so the GPM rule's
    'already explained' share is 0 and both rules keep the same leading directions (gorp.memory's docstring)."""
    energy, gpm = two_tasks("energy"), two_tasks("gpm")
    assert energy.bases.keys() == gpm.bases.keys()
    for name, s in energy.bases.items():
        assert s.shape == gpm.bases[name].shape and s.shape[1] > 0, name
        torch.testing.assert_close(s @ s.T, gpm.bases[name] @ gpm.bases[name].T, atol=1e-5, rtol=0)
