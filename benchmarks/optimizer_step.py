"""Training-step time, optimizer state and peak memory of each method on one LLaMA-config model.

    python benchmarks/optimizer_step.py                                  # hidden 512, 4 layers, seq 256, batch 4
    python benchmarks/optimizer_step.py --model demo:smollm2-135m --steps 6 --json smollm2.json

Each method runs in its own process (so peak RSS is its own): setup, ``--warmup`` steps, then ``--steps`` timed steps
(forward + method loss + backward + clip + optimizer step). ``gorp_noproj`` trains exactly gorp's parameters with plain
AdamW: gorp / gorp_noproj is the projection's own overhead, and the ratio of their mean optimizer steps (refreshes
included) is what the refresh costs where forward and backward are fast (a GPU). ``gorp`` runs GorpArgs' defaults;
``gorp_svd`` / ``gorp_rand`` name the refresh (exact float64 eigendecomposition / randomized range finder).

``--interleaved`` measures only the optimizer step, all named gorp variants in one process on one model: each step runs
one forward + backward, then every optimizer steps on the same gradients, in an order rotated every step, so that load
from other processes falls on all sides alike (the weights then take one update per optimizer: a timing harness, not a
training run). Projected state ratio: the moments and projection of the
projected matrices over what AdamW keeps for them (2 m n floats); GORP's bound is 2 r / min(m, n).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {
    "full": ("full", {"lr": 1e-5}),
    "gorp": ("gorp", {"update_gap": 10}),
    "gorp_svd": ("gorp", {"update_gap": 10, "proj_method": "svd"}),
    "gorp_rand": ("gorp", {"update_gap": 10, "proj_method": "randomized"}),
    "gorp_t200": ("gorp", {"update_gap": 200}),
    "gorp_noproj": ("gorp", {"project": False}),
    "galore": ("galore", {"update_gap": 200}),
    "lora": ("lora", {}),
    "olora": ("olora", {}),
}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model:
        from gorp.models import load_model
        from pipelines.demo_model import resolve_model

        model, _ = load_model(resolve_model(args.model))
        return model
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max(512, args.seq),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def run_one(label: str, args, queue) -> None:
    from gorp.loop import train_step
    from gorp.methods import build_method
    from gorp.optim import ProjAdamW

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, hp = METHODS[label]
    method = build_method(name, **hp)
    model = method.setup_task(build_model(args), 0)
    opt = method.make_optimizer(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    times, opt_times = [], []
    step_fn = opt.step

    def timed_step(*a, **k):
        t = time.perf_counter()
        out = step_fn(*a, **k)
        opt_times.append(time.perf_counter() - t)
        return out

    opt.step = timed_step
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        t = time.perf_counter()
        train_step(model, method, opt, batch, grad_clip=1.0)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    opt_times = opt_times[args.warmup :]
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    proj_state = proj_adamw = 0
    bound = None
    if isinstance(opt, ProjAdamW):
        for _, p, grp in opt.named_params(("projected",)):
            st = opt.state[p]
            proj_state += sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq", "proj"))
            proj_adamw += 2 * p.numel() * 4
            b = 2 * grp["rank"] / min(p.shape)
            bound = b if bound is None else max(bound, b)
    queue.put(
        {
            "label": label,
            "step_s": statistics.median(times),
            "mean_step_s": statistics.mean(times),  # amortizes the every-T-steps refreshes that a median hides
            "opt_step_s": statistics.mean(opt_times),
            "state_bytes": state,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "projected_state_ratio": proj_state / proj_adamw if proj_adamw else None,
            "projected_state_bound": bound,
        }
    )


def run_interleaved(labels: list[str], args) -> dict[str, dict]:
    """Mean / median optimizer-step seconds of each gorp variant, all stepping on the same gradients in one process."""
    from gorp.methods import build_method

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = {}
    for label in labels:
        name, hp = METHODS[label]
        if name != "gorp":
            raise SystemExit(f"--interleaved compares gorp variants (one trainable set); {label!r} is {name!r}")
        methods[label] = build_method(name, **hp)
    model = methods[labels[0]].setup_task(build_model(args), 0)
    opts = {label: m.make_optimizer(model) for label, m in methods.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    times: dict[str, list[float]] = {label: [] for label in labels}
    g = torch.Generator().manual_seed(0)
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:  # rotated: no side always goes first
            t = time.perf_counter()
            opts[label].step()
            if i >= args.warmup:
                times[label].append(time.perf_counter() - t)
        for p in params:
            p.grad = None
    return {
        label: {"opt_step_s": statistics.mean(ts), "median_opt_step_s": statistics.median(ts), "n": len(ts)}
        for label, ts in times.items()
    }


def run_separately(labels: list[str], args, console) -> dict[str, dict]:
    ctx = mp.get_context("spawn")
    results = {}
    for label in labels:
        with console.status(f"timing {label} ..."):
            q = ctx.Queue()
            proc = ctx.Process(target=run_one, args=(label, args, q))
            proc.start()
            res = q.get()
            proc.join()
        results[label] = res
        console.print(f"{label}: {res['step_s']:.3f} s/step")
    full = results.get("full")
    for r in results.values():
        r["ratio_step_vs_full"] = r["step_s"] / full["step_s"] if full else None
        r["ratio_state_vs_full"] = r["state_bytes"] / full["state_bytes"] if full else None
        r["ratio_rss_vs_full"] = r["peak_rss_bytes"] / full["peak_rss_bytes"] if full else None
    return results


def print_table(results: dict[str, dict], title: str, console) -> None:
    from rich.table import Table

    full = results.get("full")
    table = Table(title=title)
    for col in (
        "method",
        "median step s",
        "mean step s",
        "mean opt.step s",
        "vs full",
        "state MB",
        "vs full",
        "peak RSS MB",
        "proj. state",
    ):
        table.add_column(col, justify="right")
    for label, r in results.items():
        ps = r["projected_state_ratio"]
        table.add_row(
            label,
            f"{r['step_s']:.3f}",
            f"{r['mean_step_s']:.3f}",
            f"{r['opt_step_s']:.4f}",
            f"{r['ratio_step_vs_full']:.2f}x" if full else "-",
            f"{r['state_bytes'] / 2**20:.1f}",
            f"{r['ratio_state_vs_full']:.3f}x" if full else "-",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{ps:.4f} (bound {r['projected_state_bound']:.4f})" if ps is not None else "-",
        )
    console.print(table)


def print_ratios(results: dict[str, dict], console) -> dict[str, dict[str, float]]:
    """Each projected gorp variant against gorp_noproj: the optimizer step (and, when timed, the whole step)."""
    ratios: dict[str, dict[str, float]] = {}
    base = results.get("gorp_noproj")
    if base is None:
        return ratios
    for label, r in results.items():
        if not label.startswith("gorp") or label == "gorp_noproj":
            continue
        ratios[label] = {"opt_step": r["opt_step_s"] / base["opt_step_s"]}
        console.print(
            f"optimizer step {label} / gorp_noproj (mean, refreshes included): {r['opt_step_s']:.4f} s / "
            f"{base['opt_step_s']:.4f} s = {ratios[label]['opt_step']:.2f}x"
        )
        if "mean_step_s" in r:
            ratios[label]["step"] = r["mean_step_s"] / base["mean_step_s"]
            console.print(f"  whole training step (mean, refreshes included): {ratios[label]['step']:.3f}x")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local model folder or demo:smollm2-135m (default: a LLaMA-config model)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of T=10 amortizes refreshes)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--interleaved", action="store_true", help="optimizer steps only, gorp variants in one process")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from rich.console import Console

    console = Console(width=150)
    labels = args.methods.split(",")
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    model_desc = args.model or f"llama-config hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
    title = f"{model_desc}; batch {args.batch} x seq {args.seq}; {args.threads} threads"
    if args.interleaved:
        results = run_interleaved(labels, args)
        for label, r in results.items():
            console.print(
                f"{label}: mean opt.step {r['opt_step_s']:.4f} s, median {r['median_opt_step_s']:.4f} s, {r['n']} steps"
            )
    else:
        results = run_separately(labels, args, console)
        print_table(results, title, console)
    ratios = print_ratios(results, console)
    if args.json:
        payload = {"model": model_desc, "batch": args.batch, "seq": args.seq, "threads": args.threads}
        payload.update(steps=args.steps, warmup=args.warmup, interleaved=args.interleaved)
        payload.update(methods=results, ratios_vs_gorp_noproj=ratios)
        args.json.write_text(json.dumps(payload, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
