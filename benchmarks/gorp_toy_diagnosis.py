"""Why GORP forgets on the library example's toy stream (examples/gorp_only.py): where task 2's updates land.

    python benchmarks/gorp_toy_diagnosis.py [--seed 0] [--steps 120] [--set adapter_init=orthogonal ...]

Trains task 0 with GORP (``BASE`` of gorp_toy_settings.py: the example's former settings, LoRA rank 8), then
task 1, and before task 1's adapter is merged measures, for each trained matrix: how much of the task-1 update lies
inside the task-0 basis on the memory's axis (should be ~0), how much it changes the matrix's output on task 0's
inputs (relative to the output itself), how much of task 0's input energy the memory's input-side basis covers, and
the memory's size against the axis it lives on. Then task 0's accuracy with task 1's updates switched on one kind at
a time (full-rank gate_proj vs the LoRA product B A), and the memory after task 1.
CPU, one thread, a few seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import gorp_only as ex  # noqa: E402
from gorp_toy_settings import BASE  # noqa: E402

from gorp.loop import run_task, train_task  # noqa: E402
from gorp.methods import build_method  # noqa: E402
from gorp.methods.base import lora_pairs  # noqa: E402
from gorp.projector import choose_side  # noqa: E402


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        out[k] = int(v) if v.isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    return out


@torch.no_grad()
def module_inputs(model, task: int, seed: int, suffixes=("q_proj", "v_proj", "gate_proj")) -> dict[str, torch.Tensor]:
    """Inputs (tokens x n) of the named linear modules on the task's 16 evaluation prompts (every position)."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in suffixes and "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            hooks.append(m.register_forward_pre_hook(lambda _m, a, k=key: seen.__setitem__(k, a[0].flatten(0, -2))))
    ex.accuracy(model, task, seed)
    for h in hooks:
        h.remove()
    return seen


def rel(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num.detach().norm() / den.detach().norm().clamp_min(1e-30))


def update_report(model, method, before: dict, x_old: dict, x_new: dict) -> list[dict]:
    """Per trained matrix: the task-1 update's share inside the old basis and its effect on old/new inputs."""
    rows = []
    sd = {k.replace("base_model.model.", ""): v for k, v in model.state_dict().items()}
    scaling = method.args.lora_alpha / method.args.lora_r
    for mod, (a, b) in lora_pairs(model).items():
        delta = scaling * (b @ a)  # (m x n), acts on the input side
        s = method.memory.bases.get(f"{mod}.lora_A")
        w0 = before[f"{mod}.weight"]
        rows.append(_row(mod, "lora B·A", delta, s, "input", w0, x_old[mod], x_new[mod]))
    for name, w0 in before.items():
        if "gate_proj" not in name:
            continue
        mod = name[: -len(".weight")]
        delta = sd[f"{mod}.base_layer.weight"] if f"{mod}.base_layer.weight" in sd else sd[name]
        delta = delta - w0
        s = method.memory.bases.get(name)
        axis = "output" if choose_side(w0.shape) == "right" else "input"
        rows.append(_row(mod, "full-rank", delta, s, axis, w0, x_old[mod], x_new[mod]))
    return rows


def _row(mod, kind, delta, s, axis, w0, x_old, x_new) -> dict:
    k = 0 if s is None else s.shape[1]
    size = delta.shape[0] if axis == "output" else delta.shape[1]
    inside = 0.0
    coverage = None
    if k:
        inside = rel(s.T @ delta, delta) if axis == "output" else rel(delta @ s, delta)
        if axis == "input":
            coverage = rel(x_old @ s, x_old) ** 2
    return {
        "module": mod.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", ""),
        "kind": kind,
        "basis": f"{k}/{size} ({axis})",
        "inside_basis": inside,
        "old_input_coverage": coverage,
        "d_out_old": rel(x_old @ delta.T, x_old @ w0.T),
        "d_out_new": rel(x_new @ delta.T, x_new @ w0.T),
        "norm": float(delta.detach().norm()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--set", nargs="*", default=[], help="gorp hyperparameters KEY=VALUE over the example's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hp = {**BASE["gorp"], **parse_sets(args.set)}
    seed = args.seed
    model = ex.small_llama(seed)
    method = build_method("gorp", **hp)
    model, _ = run_task(model, method, 0, ex.batches(0, args.steps, seed=seed))
    model.eval()
    acc0 = ex.accuracy(model, 0, seed)
    before = {k: v.clone() for k, v in model.state_dict().items() if "q_proj" in k or "v_proj" in k or "gate" in k}
    x_old, x_new = module_inputs(model, 0, seed), module_inputs(model, 1, seed)
    print(f"gorp {hp}\nseed {seed}: task 0 accuracy after task 0: {acc0:.2f}")
    print("memory after task 0 (directions / axis size):")
    for k, v in method.memory.dims().items():
        print(f"  {k}: {v}")
    # task 1, by hand so that the adapter can be inspected before it is merged
    model = method.setup_task(model, 1)
    opt = method.make_optimizer(model)
    train_task(model, method, opt, ex.batches(1, args.steps, seed=seed)())
    model.eval()
    rows = update_report(model, method, before, x_old, x_new)
    print("\ntask 1's update per matrix: share inside the task-0 basis, task-0 input energy the basis covers,")
    print("relative output change on task 0's and task 1's inputs")
    print(f"{'module':<14}{'kind':<10}{'basis':<18}{'inside':>8}{'cover':>7}{'dOut old':>10}{'dOut new':>10}")
    for r in rows:
        cov = "-" if r["old_input_coverage"] is None else f"{r['old_input_coverage']:.2f}"
        print(
            f"{r['module']:<14}{r['kind']:<10}{r['basis']:<18}{r['inside_basis']:>8.1e}{cov:>7}"
            f"{r['d_out_old']:>10.3f}{r['d_out_new']:>10.3f}"
        )
    ablation(model, before, seed)
    moments_inside(method, opt)
    method.end_task(model, opt)
    print("\nmemory after task 1 (directions):", method.memory.dims())


@torch.no_grad()
def moments_inside(method, opt) -> None:
    """Share of each task-1 final first moment's energy inside the task-0 basis: the GPM rule's 'projected' term.

    The moments are built from gradients the optimizer already removed the basis from, so this is ~0 and the GPM rule
    (add residual directions up to the threshold of the total) picks what the energy rule picks.
    """
    print("\ntask 1's final first moment: share of its energy inside the task-0 basis (what the GPM rule tests):")
    for name, p, g in opt.named_params(("lora_a", "projected")):
        m, s = opt.canonical_moment(p, g), method.memory.bases.get(name)
        if m is not None and s is not None:
            print(f"  {name}: {rel(s.T @ m, m) ** 2:.1e}")


@torch.no_grad()
def ablation(model, before: dict, seed: int) -> None:
    """Task 0 / task 1 accuracy with task 1's full-rank update and its adapter switched on and off."""
    gate = {n: p for n, p in model.named_parameters() if "gate_proj" in n}
    now = {n: p.clone() for n, p in gate.items()}
    print("\ntask 0 / task 1 accuracy after task 1, by which of task 1's updates are kept:")
    for keep_gate in (True, False):
        for n, p in gate.items():
            p.copy_(now[n] if keep_gate else before[n.replace("base_model.model.", "")])
        for keep_lora in (True, False):
            if keep_lora:
                a0, a1 = ex.accuracy(model, 0, seed), ex.accuracy(model, 1, seed)
            else:
                with model.disable_adapter():
                    a0, a1 = ex.accuracy(model, 0, seed), ex.accuracy(model, 1, seed)
            on = f"full-rank {'on ' if keep_gate else 'off'}  LoRA {'on ' if keep_lora else 'off'}"
            print(f"  {on}: {a0:.2f} / {a1:.2f}")


if __name__ == "__main__":
    main()
