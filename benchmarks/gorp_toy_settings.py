"""GORP's options on the library example's toy stream (examples/gorp_only.py): AA and BWT per setting, over seeds.

    python benchmarks/gorp_toy_settings.py [--seeds 0,1,2] [--steps 120] [--only NAME,...]

Each setting is a method and the hyperparameters that differ from ``BASE`` (the example's settings before it took
rank 32: LoRA rank 8, memory at 90% energy, Kaiming A); a seed changes the
model's initialization, the tasks' key -> value permutations and the batches. Prints one line per (setting, seed) as it
finishes and a table of mean and standard deviation. CPU, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import gorp_only as ex  # noqa: E402

BASE = {
    "full": {"lr": 2e-3},
    "lora": {"lr": 5e-3, "lora_dropout": 0.0},
    "olora": {"lr": 5e-3, "lora_dropout": 0.0},
    "gorp": {
        "lr": 5e-3,
        "full_rank_lr": 2e-3,
        "lora_dropout": 0.0,
        "scale": 1.0,
        "update_gap": 10,
        "adapter_init": "kaiming",  # the paper's init, as when these settings were measured
    },
}
SETTINGS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "lora": ("lora", {}),
    "olora": ("olora", {}),
    "gorp (example)": ("gorp", {}),  # BASE: the example before it took rank 32
    "gorp no memory": ("gorp", {"use_memory": False}),
    "gorp gpm": ("gorp", {"memory_rule": "gpm"}),
    "gorp orthogonal": ("gorp", {"adapter_init": "orthogonal"}),
    "gorp orth+gpm": ("gorp", {"adapter_init": "orthogonal", "memory_rule": "gpm"}),
    "gorp thr 0.99": ("gorp", {"memory_threshold": 0.99}),
    "gorp orth thr 0.99": ("gorp", {"adapter_init": "orthogonal", "memory_threshold": 0.99}),
    "gorp scale 0.25": ("gorp", {"scale": 0.25}),
    # rank 32 (alpha 128: the same LoRA scaling 4): room for up to 32 input directions per matrix and task
    "lora r32": ("lora", {"lora_r": 32, "lora_alpha": 128.0}),
    "gorp r32": ("gorp", {"lora_r": 32, "lora_alpha": 128.0}),
    "gorp r32 orth": ("gorp", {"lora_r": 32, "lora_alpha": 128.0, "adapter_init": "orthogonal"}),
    "gorp r32 orth 0.99": (
        "gorp",
        {"lora_r": 32, "lora_alpha": 128.0, "adapter_init": "orthogonal", "memory_threshold": 0.99},
    ),
    "gorp r32 orth 0.999": (
        "gorp",
        {"lora_r": 32, "lora_alpha": 128.0, "adapter_init": "orthogonal", "memory_threshold": 0.999},
    ),
    "gorp r32 0.99": ("gorp", {"lora_r": 32, "lora_alpha": 128.0, "memory_threshold": 0.99}),
    "lora r64": ("lora", {"lora_r": 64, "lora_alpha": 256.0}),
    "gorp r64 orth 0.99": (
        "gorp",
        {"lora_r": 64, "lora_alpha": 256.0, "adapter_init": "orthogonal", "memory_threshold": 0.99},
    ),
}


def fmt(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):+.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in SETTINGS if not args.only or n in args.only.split(",")]
    table = {}
    for name in names:
        method, over = SETTINGS[name]
        res = []
        for seed in seeds:
            t0 = time.process_time()
            r = ex.run(method, args.steps, seed, {**BASE[method], **over})
            diag = [r["matrix"][i][i] for i in range(ex.N_TASKS)]
            print(
                f"{name:<20} seed {seed}: AA {r['aa']:.3f} BWT {r['bwt']:+.3f} R[i][i] {diag} "
                f"last row {r['matrix'][-1]} ({time.process_time() - t0:.1f} CPU s)",
                flush=True,
            )
            res.append(r)
        table[name] = res
    print(f"\n{args.steps} steps per task, seeds {seeds}: mean ± std")
    print(f"{'setting':<20}{'AA':>16}{'BWT':>16}{'learned R[i][i]':>18}")
    for name, res in table.items():
        learned = [statistics.mean(r["matrix"][i][i] for i in range(ex.N_TASKS)) for r in res]
        print(f"{name:<20}{fmt([r['aa'] for r in res]):>16}{fmt([r['bwt'] for r in res]):>16}{fmt(learned):>18}")


if __name__ == "__main__":
    main()
