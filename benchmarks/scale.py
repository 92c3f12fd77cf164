"""Peak memory and step time of SmolLM2-135M on CPU: fp32 vs bf16, activation checkpointing off vs on, GORP and full
fine-tuning, each measured in a fresh process (:mod:`gorp.memprobe`: peak RSS over the post-import baseline), beside
the memory plan's estimate (:mod:`gorp.memplan`).

    python benchmarks/scale.py                       # the prepared demo model (~/.cache/gorp), else its shape, random
    python benchmarks/scale.py --batch 4 --seq 128 --steps 3 --out benchmarks/results/scale_cpu.txt
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gorp.memplan import fmt_bytes, plan_memory  # noqa: E402
from gorp.memprobe import SMOLLM2, measure  # noqa: E402


def model_spec() -> tuple[dict, object, str]:
    """(memprobe model spec, config, description)."""
    from transformers import AutoConfig, LlamaConfig

    folder = Path(os.environ.get("GORP_CACHE", "~/.cache/gorp")).expanduser() / "models" / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return {"path": str(folder)}, AutoConfig.from_pretrained(folder), f"SmolLM2-135M-Instruct ({folder})"
    return {"llama": SMOLLM2}, LlamaConfig(**SMOLLM2), "SmolLM2-135M shape, random weights (demo model not prepared)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per run; the step time is the median after the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="gorp,full")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    spec, config, what = model_spec()
    lines = [
        f"{what}; batch {args.batch} x {args.seq} tokens, {args.steps} steps, {args.threads} torch threads",
        "peak: RSS high-water mark over the post-import baseline (fresh process, fixed malloc mmap threshold)",
        f"{'method':<6} {'precision':<9} {'ckpt':<5} {'peak':>11} {'plan':>11} {'plan/peak':>9} {'step s':>7}",
    ]
    print("\n".join(lines), flush=True)
    for method, precision, ac in itertools.product(args.methods.split(","), args.precisions.split(","), (False, True)):
        req = {
            "model": spec,
            "method": method,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "precision": precision,
            "activation_checkpointing": ac,
            "threads": args.threads,
        }
        got = measure(req, timeout=1800)
        plan = plan_memory(
            config,
            method,
            {},
            batch_size=args.batch,
            seq_len=args.seq,
            precision=precision,
            activation_checkpointing=ac,
        )
        step = statistics.median(got["step_s"][1:] or got["step_s"])
        row = (
            f"{method:<6} {precision:<9} {'on' if ac else 'off':<5} {fmt_bytes(got['peak_bytes']):>11} "
            f"{fmt_bytes(plan.peak):>11} {plan.peak / got['peak_bytes']:>9.2f} {step:>7.2f}"
        )
        lines.append(row)
        print(row, flush=True)
    lines.append(f"load average at the end: {os.getloadavg()}")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
