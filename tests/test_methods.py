"""Baselines: O-LoRA's regularizer, OSFT's frozen directions, SLICE's initialization; method state round trips."""

from __future__ import annotations

import pytest
import torch

from gorp.loop import run_task
from gorp.methods import METHODS, build_method
from gorp.methods.base import ContinualMethod, lora_pairs
from gorp.methods.slice import gradient_surgery
from tiny_models import tiny_llama


def batches(task: int, n: int = 4, bs: int = 4):
    def gen():
        g = torch.Generator().manual_seed(50 + task)
        for _ in range(n):
            ids = torch.randint(0, 128, (bs, 10), generator=g)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return gen


def test_olora_regularizer_equals_hand_computation():
    method = build_method("olora", lambda1=0.5, lambda2=0.1, lora_dropout=0.0)
    model, _ = run_task(tiny_llama(seed=0), method, 0, batches(0))
    old = {m: a.clone() for m, a in method.old_a.items()}
    assert all(a.shape == (8, 32) for a in old.values())
    model = method.setup_task(model, 1)
    reg = method.extra_loss(model)
    expected = 0.0
    for m, (a, b) in lora_pairs(model).items():
        a_new, b_new, a_old = a.detach().double().numpy(), b.detach().double().numpy(), old[m].double().numpy()
        expected += 0.5 * abs(a_old @ a_new.T).sum()
        expected += 0.1 * ((a_new**2).sum() ** 0.5 + (b_new**2).sum() ** 0.5)
    assert float(reg) == pytest.approx(expected, rel=1e-5)
    reg.backward()  # differentiable in the new adapter only
    assert all(a.grad is not None for a, _ in lora_pairs(model).values())


def test_osft_leaves_frozen_singular_directions_unchanged():
    method = build_method("osft", lr=1e-2, retain=0.5)
    model = tiny_llama(seed=0).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, losses = run_task(model, method, 0, batches(0, n=6))
    assert losses[-1] < losses[0]
    changed = 0
    for name, (u, v) in method.frozen.items():
        w0, w1 = before[name], model.state_dict()[name]
        u, v = u.double(), v.double()
        assert u.shape[1] == round(0.5 * min(w0.shape))
        torch.testing.assert_close(u.T @ w1, u.T @ w0, rtol=0, atol=1e-6)  # frozen left directions
        torch.testing.assert_close(w1 @ v, w0 @ v, rtol=0, atol=1e-6)  # frozen right directions
        s_top = torch.linalg.svdvals(w0)[: u.shape[1]]
        torch.testing.assert_close(torch.diagonal(u.T @ w1 @ v), s_top, rtol=1e-6, atol=1e-6)
        changed += int((w1 - w0).norm() > 1e-4)
    assert changed == len(method.frozen)  # and the rest did train


def test_gradient_surgery_only_when_conflicting():
    g_r = torch.tensor([1.0, 0.0, 0.0])
    g, cos, applied = gradient_surgery(torch.tensor([-1.0, 1.0, 0.0]), g_r, 1.0)
    assert applied and cos == pytest.approx(-(0.5**0.5))
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0, 0.0]))  # PCGrad: the conflict removed
    g, cos, applied = gradient_surgery(torch.tensor([1.0, 1.0, 0.0]), g_r, 1.0)
    assert not applied and cos > 0
    torch.testing.assert_close(g, torch.tensor([1.0, 1.0, 0.0]))
    g, _, _ = gradient_surgery(torch.tensor([-2.0, 1.0, 0.0]), g_r, 0.5)  # c = 0.5: half of the conflict removed
    torch.testing.assert_close(g, torch.tensor([-1.0, 1.0, 0.0]))


def test_slice_initialization_keeps_the_output_and_follows_the_cosine():
    method = build_method("slice", replay_per_task=8)
    model, _ = run_task(tiny_llama(seed=0), method, 0, batches(0))
    assert method.replay["input_ids"].shape == (8, 10)
    probe = next(iter(batches(7)()))
    model.eval()
    with torch.no_grad():
        ref = model(**probe).logits
    model = method.setup_task(model, 1, batches=batches(1))
    model.eval()
    with torch.no_grad():
        out = model(**probe).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert method.cosines and set(method.surgered) == set(method.cosines)
    for m, cos in method.cosines.items():
        assert method.surgered[m] == (cos < 0)
    for _, (a, b) in lora_pairs(model).items():
        assert a.abs().sum() > 0 and b.abs().sum() > 0  # initialized from the gradient, not zero


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_tasks_and_state_round_trip(name, tmp_path):
    args = {"lora_dropout": 0.0} if name in ("gorp", "lora", "olora") else {}
    method = build_method(name, **args)
    model = tiny_llama(seed=0)
    for task in range(2):
        model, losses = run_task(model, method, task, batches(task))
        assert all(torch.isfinite(torch.tensor(losses)))
    assert type(model).__name__ == "LlamaForCausalLM"  # adapters merged: a plain model
    method.save(tmp_path)
    back = ContinualMethod.load(tmp_path)
    assert type(back) is type(method) and back.tasks_seen == 2 and back.hparams() == method.hparams()
    a, b = method.state_tensors(), back.state_tensors()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name in ("gorp", "olora", "slice", "lora"):
        assert a, f"{name} must carry state between tasks"


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_merged_model_from_the_state_dict_equals_the_in_place_merge(arch):
    """What a stage does at its end (finalize_state_dict, then model_from_state_dict) gives the model that PEFT's
    in-place merge gives, holding the state dict's own tensors (no copy), tied weights tied (T5)."""
    from gorp.models import model_from_state_dict
    from tiny_models import tiny_t5

    make = tiny_llama if arch == "llama" else tiny_t5
    method = build_method("gorp", lora_dropout=0.0, update_gap=2, full_rank_lr=1e-3)
    base = make(seed=0)
    cls, config = type(base), base.config
    model = method.setup_task(base, 0)
    opt = method.make_optimizer(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(2, 128, (2, 8), generator=g)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    plain = method.finalize_state_dict({k: v.detach() for k, v in model.state_dict().items()})
    rebuilt = model_from_state_dict(cls, config, plain)
    merged = method.finalize(model)
    assert type(rebuilt) is type(merged) and not rebuilt.training
    assert rebuilt.state_dict().keys() == merged.state_dict().keys()
    for k, v in rebuilt.state_dict().items():
        torch.testing.assert_close(v, merged.state_dict()[k], rtol=0, atol=1e-6)
    shared = sum(v.data_ptr() == plain[k].data_ptr() for k, v in rebuilt.state_dict().items())
    assert shared == len(plain)
    ids = torch.randint(2, 128, (2, 8), generator=g)
    kw = {"decoder_input_ids": ids[:, :3]} if arch == "t5" else {}
    torch.testing.assert_close(rebuilt(input_ids=ids, **kw).logits, merged.eval()(input_ids=ids, **kw).logits)
    if arch == "t5":
        assert rebuilt.lm_head.weight.data_ptr() == rebuilt.shared.weight.data_ptr()


def test_gorp_on_t5_targets_self_attention_lora_and_cross_attention_full_rank():
    from tiny_models import tiny_t5

    method = build_method("gorp", lora_dropout=0.0, update_gap=2, full_rank_lr=1e-3)
    model = method.setup_task(tiny_t5(seed=0), 0)
    opt = method.make_optimizer(model)
    names = {name for name, _, _ in opt.named_params(("projected",))}
    assert names and all("EncDecAttention" in n for n in names)
    assert all("SelfAttention" in m for m in lora_pairs(model))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(2, 128, (2, 8), generator=g)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids[:, :4].contiguous()).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    method.end_task(model, opt)
    assert len(method.memory) == len(names) + len(lora_pairs(model))
    assert type(method.finalize(model)).__name__ == "T5ForConditionalGeneration"
