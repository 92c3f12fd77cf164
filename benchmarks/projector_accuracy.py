"""How far each projection refresh is from the exact float64 basis on real SmolLM2-135M gradients, and its cost.

    python benchmarks/projector_accuracy.py                       # 2 random-token + 2 text batches: 120 gradients
    python benchmarks/projector_accuracy.py --save-spectra tests/data/smollm2_gate_proj_spectra.safetensors

The gradients are those GORP projects: every layer's ``mlp.gate_proj`` (1536 x 576, right side), from batches of random
tokens (as ``optimizer_step.py`` feeds) and of WordNet task text (``examples/data/wordnet``), 4 x 256 tokens each. The
reference is ``torch.linalg.svd`` in float64. For each refresh and gradient: the largest principal angle between its
rank-r subspace and the reference's, and the share of the best rank-r energy it captures, ||G P^T||^2 / sum_i<r s_i^2.
The angle is large wherever s_r+1 / s_r is close to 1 (the top-r subspace is then barely defined); the energy is what
the projected step keeps. Cost: seconds per matrix, all refreshes interleaved on the same gradients.

``--save-spectra`` writes the singular values of the gradients with the smallest gap s_r+1 / s_r, for the test that
pins the randomized defaults (tests/test_projector.py): a Gaussian sketch sees only the spectrum, so a matrix with the
same singular values and random singular vectors is, for the range finder, the same problem.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gorp.projector import compute_projection  # noqa: E402

TEXT_TASKS = ("hypernym", "domain", "noun_topic")


def refreshes(rank: int) -> dict:
    """Each refresh under test: G (m x n, m >= n) -> P (r x n)."""

    def f32_gram(g: torch.Tensor) -> torch.Tensor:  # the float64 path with float32 arithmetic, for comparison
        evecs = torch.linalg.eigh(g.float().T @ g.float()).eigenvectors
        return evecs[:, -rank:].T

    def randomized(**kw):
        return lambda g: compute_projection(g, rank, "right", method="randomized", **kw)

    return {
        "svd (float64 Gram)": lambda g: compute_projection(g, rank, "right", method="svd"),
        "float32 Gram eigh": f32_gram,
        "randomized p=24 q=2 (default)": randomized(),
        "randomized p=24 q=2 seed 1": randomized(seed=1),
        "randomized p=8 q=2 (old default)": randomized(oversample=8, power_iters=2),
        "randomized p=32 q=2": randomized(oversample=32, power_iters=2),
        "randomized p=24 q=3": randomized(oversample=24, power_iters=3),
        "randomized p=24 q=1": randomized(oversample=24, power_iters=1),
    }


def text_batches(tokenizer, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    texts = []
    for task in TEXT_TASKS:
        with open(ROOT / "examples" / "data" / "wordnet" / f"{task}.train.jsonl") as f:
            for line in f:
                row = json.loads(line)
                texts.append(f"{row['instruction']}\n{row['input']}\n{row['output']}")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    size = batch * seq
    return [ids[i * size : (i + 1) * size].reshape(batch, seq) for i in range(n)]


def capture(args) -> dict[str, torch.Tensor]:
    """gate_proj gradients of the demo model, one set per batch (no optimizer step: same weights throughout)."""
    from gorp.models import load_model
    from pipelines.demo_model import resolve_model

    model, tokenizer = load_model(resolve_model(args.model))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("mlp.gate_proj.weight"))
    gen = torch.Generator().manual_seed(0)
    batches = {
        f"random{i}": torch.randint(0, model.config.vocab_size, (4, 256), generator=gen) for i in range(args.random)
    }
    batches.update({f"text{i}": b for i, b in enumerate(text_batches(tokenizer, args.text, 4, 256))})
    grads = {}
    for tag, ids in batches.items():
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                layer = name.split("layers.")[1].split(".")[0]
                grads[f"{tag}/layer{layer}"] = p.grad.detach().clone()
                p.grad = None
    return grads


def principal_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the row spaces of two (r x n) matrices with orthonormal rows."""
    s = torch.linalg.svdvals(a.double() @ b.double().T).clamp(max=1.0)
    return math.degrees(math.acos(float(s.min())))


def measure(grads: dict[str, torch.Tensor], rank: int) -> tuple[dict, dict]:
    """Per refresh: angles, energy shares and seconds per matrix; and the reference spectra."""
    fns = refreshes(rank)
    rows = {name: {"angle": [], "energy": [], "seconds": []} for name in fns}
    spectra = {}
    for i, (key, g) in enumerate(grads.items()):
        _, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        spectra[key] = s
        best = float(s[:rank].square().sum())
        names = list(fns)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotated, so load falls on all alike
            t = time.perf_counter()
            p = fns[name](g)
            rows[name]["seconds"].append(time.perf_counter() - t)
            rows[name]["angle"].append(principal_angle_deg(p, vh[:rank]))
            rows[name]["energy"].append(float((g.double() @ p.double().T).square().sum()) / best)
    return rows, spectra


def summarize(rows: dict) -> dict:
    return {
        name: {
            "angle_deg_median": statistics.median(r["angle"]),
            "angle_deg_max": max(r["angle"]),
            "energy_share_min": min(r["energy"]),
            "energy_share_mean": statistics.mean(r["energy"]),
            "ms_per_matrix_median": 1000 * statistics.median(r["seconds"]),
        }
        for name, r in rows.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo:smollm2-135m")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--random", type=int, default=2, help="random-token batches")
    ap.add_argument("--text", type=int, default=2, help="WordNet text batches")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--save-spectra", type=Path, help="write the hardest spectra (smallest gap at the rank) here")
    ap.add_argument("--n-spectra", type=int, default=4)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    console = Console(width=150)
    with console.status("capturing gradients ..."):
        grads = capture(args)
    with console.status(f"measuring {len(grads)} gradients ..."):
        rows, spectra = measure(grads, args.rank)
    figures = summarize(rows)
    r = args.rank
    gaps = {k: float(s[r] / s[r - 1]) for k, s in spectra.items()}
    title = (
        f"{args.model} gate_proj gradients: {len(grads)} matrices, rank {r}, {args.threads} threads; "
        f"s_{r + 1}/s_{r}: median {statistics.median(gaps.values()):.3f}, max {max(gaps.values()):.4f}"
    )
    table = Table(title=title)
    for col in ("refresh", "angle deg median", "angle deg max", "energy share min", "energy share mean", "ms/matrix"):
        table.add_column(col, justify="right")
    for name, f in figures.items():
        table.add_row(
            name,
            f"{f['angle_deg_median']:.3f}",
            f"{f['angle_deg_max']:.3f}",
            f"{f['energy_share_min']:.5f}",
            f"{f['energy_share_mean']:.5f}",
            f"{f['ms_per_matrix_median']:.1f}",
        )
    console.print(table)
    if args.save_spectra:
        hardest = sorted(gaps, key=gaps.get, reverse=True)[: args.n_spectra]
        save_file({k.replace("/", "."): spectra[k].contiguous() for k in hardest}, str(args.save_spectra))
        console.print(f"wrote {args.save_spectra}: {', '.join(f'{k} ({gaps[k]:.4f})' for k in hardest)}")
    if args.json:
        payload = {"model": args.model, "rank": r, "threads": args.threads, "matrices": len(grads)}
        payload.update(gap_median=statistics.median(gaps.values()), gap_max=max(gaps.values()), refreshes=figures)
        args.json.write_text(json.dumps(payload, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
