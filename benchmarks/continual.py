"""Continual-learning quality of every method on the six-task WordNet stream, over several seeds, through the real
pipeline (:func:`pipelines.sequence.run_sequence`: Ray Data, Ray Train, the stage evaluation; no MLflow).

    python benchmarks/continual.py                                 # 7 methods x seeds 0,1 (resumable), then the report
    python benchmarks/continual.py --configs gorp,gorp:memory_rule=gpm,gorp:scale=1 --seeds 0,1
    python benchmarks/continual.py --report                        # the table and plots from the results so far

Every configuration gets the same caps (``--steps`` optimizer steps per stage of ``--batch`` examples, the first
``--eval`` test examples of each task) and the same seeds; each method runs with its own defaults (``gorp/methods``),
a ``method:key=value`` configuration changes one of them. One results file per (configuration, seed) in ``--out``: a
pair whose file exists is not run again, so an interrupted grid continues where it stopped. The report: a table of AA,
BWT, FWT and forgetting (mean +- std over seeds), training time per stage and the optimizer state the memory plan
counts for the method (:mod:`gorp.memplan`, SmolLM2-135M, the stream's batch), written to ``<out>/summary.md``; plots
of AA after each stage and of each configuration's final accuracy matrix in ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.sequence import Callback  # noqa: E402

METHODS = ("gorp", "full", "lora", "olora", "galore", "osft", "slice")


def parse_config(name: str) -> tuple[str, dict]:
    """``gorp:memory_rule=gpm,scale=1`` -> ("gorp", {"memory_rule": "gpm", "scale": 1})."""
    method, _, rest = name.partition(":")
    args = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        args[key] = yaml.safe_load(value)
    return method, args


SUBSPACE_STATE = ("memory/", "old_a/")  # GORP's bases (d, k), O-LoRA's earlier A rows (k, n)


def memory_use(shapes: dict[str, list[int]]) -> dict[str, float]:
    """The subspace memory a method carried into a stage (``SUBSPACE_STATE``; not a replay buffer or a continued
    adapter): how many matrices and the share of its space each fills (k / d), mean and largest over the matrices."""
    fills = [min(s) / max(s) for k, s in shapes.items() if k.startswith(SUBSPACE_STATE) and len(s) == 2 and max(s) > 0]
    if not fills:
        return {"tensors": 0, "mean_fill": 0.0, "max_fill": 0.0}
    return {"tensors": len(fills), "mean_fill": sum(fills) / len(fills), "max_fill": max(fills)}


def order(caps: dict) -> str:
    """How the seed reached the training rows (results before ``training.shuffle`` were in file order)."""
    if caps.get("shuffle"):
        return "the rows in a new permutation per seed, so each seed trains on another subset of each task"
    return "the rows in file order: the seed changed only the adapters' initialization"


def capped_stream(base: dict, method: str, args: dict, *, seed: int, steps: int, batch: int, eval_n: int, run_dir):
    from pipelines.spec import parse_stream

    data = {**base, "method": method, "method_args": args, "run_dir": str(run_dir)}
    data["training"] = {
        **base["training"],
        "seed": seed,  # the adapters' initialization and the order (hence the subset) of each task's training rows
        "shuffle": True,
        "max_steps": steps,
        "batch_size": batch,
        "max_eval_examples": eval_n,
        "checkpoint_every": 0,
    }
    return parse_stream(data, where=f"{method} {args} seed {seed}")


class StageLines(Callback):
    """A line per completed stage (a pair takes minutes)."""

    def __init__(self, name: str, seed: int):
        self.name, self.seed, self.t0 = name, seed, time.perf_counter()

    def on_stage_end(self, plan, result) -> None:
        row = " ".join(f"{t[:8]} {a * 100:.0f}" for t, a in result.row.items())
        took = time.perf_counter() - self.t0
        print(f"    {self.name} seed {self.seed} stage {result.stage + 1}: {row} ({took:.0f} s)", flush=True)


def run_pair(base: dict, name: str, seed: int, opts, work: Path) -> dict:
    """Train the whole stream for one (configuration, seed); the record written to its results file."""
    from pipelines.sequence import run_sequence

    method, args = parse_config(name)
    run_dir = work / f"{safe(name)}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    stream = capped_stream(
        base, method, args, seed=seed, steps=opts.steps, batch=opts.batch, eval_n=opts.eval, run_dir=run_dir
    )
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    seq = run_sequence(stream, run_dir=run_dir, cache_dir=work / "cache", callbacks=[StageLines(name, seed)])
    wall = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)  # stage models: ~0.5 GB each
    return {
        "config": name,
        "method": method,
        "method_args": args,
        "seed": seed,
        "tasks": seq.tasks,
        "matrix": seq.matrix,
        "zero_shot": seq.zero_shot,
        "summary": seq.summary,
        "train_s": [s.timings.get("train_s") for s in seq.stages],
        "eval_s": [s.timings.get("eval_s") for s in seq.stages],
        "final_loss": [s.losses[-1] if s.losses else None for s in seq.stages],
        "memory": [memory_use(s.start.get("memory") or {}) for s in seq.stages],
        "answers": [s.answers for s in seq.stages],
        "method_stats": [s.method_stats for s in seq.stages],
        "wall_s": wall,
        "caps": {"steps": opts.steps, "batch": opts.batch, "eval": opts.eval, "shuffle": True},
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def safe(name: str) -> str:
    return name.replace(":", "_").replace("=", "-").replace(";", "_")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads per worker = the stream's cpus_per_worker"


def commit() -> str:
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return git.stdout.strip()
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------------- report
def load_results(out: Path) -> dict[str, list[dict]]:
    by_config: dict[str, list[dict]] = {}
    for f in sorted(out.glob("*-seed*.json")):
        rec = json.loads(f.read_text())
        by_config.setdefault(rec["config"], []).append(rec)
    return by_config


def mean_std(xs: list[float | None], scale: float = 100.0) -> str:
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def optimizer_state(method: str, args: dict, batch: int) -> str:
    """The optimizer state (and task memory) the memory plan counts for this method on SmolLM2-135M."""
    from gorp.memplan import fmt_bytes, plan_memory
    from gorp.memprobe import SMOLLM2

    try:
        from transformers import LlamaConfig

        plan = plan_memory(LlamaConfig(**SMOLLM2), method, args, batch_size=batch, seq_len=136, tasks=6)
        return fmt_bytes(plan.optimizer)
    except Exception as e:  # noqa: BLE001 - a column of the report, never its end
        return f"? ({e.__class__.__name__})"


def stage_aa(matrix: list[list[float | None]]) -> list[float]:
    """AA after each stage: :func:`gorp.metrics.average_accuracy` of the matrix up to that stage."""
    from gorp.metrics import average_accuracy

    return [average_accuracy(matrix[: t + 1]) for t in range(len(matrix))]


def aa_over_stages(matrix: list[list[float | None]]) -> float:
    """The mean of AA after each stage (average incremental accuracy): the whole stream, not only its end."""
    return statistics.mean(stage_aa(matrix))


def summary_table(by_config: dict[str, list[dict]]) -> str:
    head = (
        "| method | seeds | AA | AA over stages | BWT | FWT | forgetting | train s/stage (fastest seed) | "
        "optimizer state |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, recs in by_config.items():
        s = [r["summary"] for r in recs]
        # other work on the machine only slows a pair down: its least disturbed seed is the best estimate
        train = min(statistics.mean(t for t in r["train_s"] if t is not None) for r in recs)
        lines.append(
            f"| {name} | {len(recs)} | {mean_std([x['aa'] for x in s])} | "
            f"{mean_std([aa_over_stages(r['matrix']) for r in recs])} | {mean_std([x['bwt'] for x in s])} | "
            f"{mean_std([x['fwt'] for x in s])} | {mean_std([x['forgetting'] for x in s])} | {train:.0f} | "
            f"{optimizer_state(recs[0]['method'], recs[0]['method_args'], recs[0]['caps']['batch'])} |"
        )
    return "\n".join(lines)


def final_rows(by_config: dict[str, list[dict]]) -> str:
    """Per configuration, each task's accuracy right after it was learned and at the end (mean over seeds)."""
    out = []
    for name, recs in by_config.items():
        tasks = recs[0]["tasks"]
        learned = [statistics.mean(r["matrix"][i][i] for r in recs) for i in range(len(tasks))]
        final = [statistics.mean(r["matrix"][-1][i] for r in recs) for i in range(len(tasks))]
        cells = ", ".join(f"{t} {a * 100:.0f}->{b * 100:.0f}" for t, a, b in zip(tasks, learned, final, strict=True))
        out.append(f"- {name}: {cells}")
    return "\n".join(out)


def drops(by_config: dict[str, list[dict]], at_least: float = 0.2) -> str:
    """Every fall of a task's accuracy by ``at_least`` or more from right after it was learned to a later stage, with
    what the model then answered (the records that hold answers)."""
    out = []
    for name, recs in by_config.items():
        for r in recs:
            m, tasks = r["matrix"], r["tasks"]
            for t in range(1, len(m)):
                for i in range(t):
                    if m[i][i] - m[t][i] >= at_least and r.get("answers"):
                        said = ", ".join(f"{a} {c}" for a, c in r["answers"][t].get(tasks[i], {}).items())
                        out.append(
                            f"- {name} seed {r['seed']}: {tasks[i]} {m[i][i] * 100:.0f} -> {m[t][i] * 100:.0f} after "
                            f"stage {t + 1} ({tasks[t]}); it answered: {said}"
                        )
    return "\n".join(out) or "- (none recorded)"


def memory_lines(by_config: dict[str, list[dict]]) -> str:
    """What each configuration with a task memory carried into the last stage (mean over seeds)."""
    out = []
    for name, recs in by_config.items():
        if recs[0]["method"] not in ("gorp", "olora"):  # older results counted every 2-D state tensor
            continue
        last = [r["memory"][-1] for r in recs if r.get("memory") and r["memory"][-1]["tensors"]]
        if last:
            mean, top = (statistics.mean(m[k] for m in last) * 100 for k in ("mean_fill", "max_fill"))
            out.append(
                f"- {name}: {last[0]['tensors']} state matrices carried into the last stage, each filling "
                f"{mean:.1f}% of its space on average (largest {top:.1f}%)"
            )
    return "\n".join(out) or "- (no configuration here recorded its memory)"


def removal_lines(by_config: dict[str, list[dict]]) -> str:
    """Per configuration that measured it (gorp), the share of each stage's gradient energy its task memory removed,
    on LoRA A and on the full-rank weights (mean over the matrices and the seeds; the largest matrix in brackets)."""
    out = []
    for name, recs in by_config.items():
        recs = [r for r in recs if any(r.get("method_stats") or [])]
        if not recs:
            continue
        parts = []
        for label, key in (("LoRA A", "memory_removed_lora_a"), ("full-rank", "memory_removed_full_rank")):
            cells = []
            for t in range(len(recs[0]["method_stats"])):
                stats = [r["method_stats"][t] for r in recs if key in r["method_stats"][t]]
                if stats:
                    mean = statistics.mean(x[key] for x in stats) * 100
                    top = max(x[f"{key}_max"] for x in stats) * 100
                    cells.append(f"{mean:.0f}% ({top:.0f}%)")
            parts.append(f"{label}: " + ", ".join(cells))
        out.append(f"- {name} ({len(recs)} seeds), stage 1 to {len(recs[0]['method_stats'])}: " + "; ".join(parts))
    return "\n".join(out) or "- (no configuration here measured it)"


def plots(by_config: dict[str, list[dict]], docs: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    docs.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    methods = list(dict.fromkeys(recs[0]["method"] for recs in by_config.values()))
    variants: dict[str, int] = {}
    for name, recs in by_config.items():
        aa = np.array([stage_aa(r["matrix"]) for r in recs]) * 100
        x = np.arange(1, aa.shape[1] + 1)
        method = recs[0]["method"]
        if ":" in name:  # a variant: its method's colour, dashed, a marker of its own
            variants[method] = variants.get(method, 0) + 1
            style, marker = "--", "sv^D<>p"[(variants[method] - 1) % 7]
        else:
            style, marker = "-", "o"
        color = plt.get_cmap("tab10")(methods.index(method) % 10)
        err = aa.std(0) if len(recs) > 1 else None
        ax.errorbar(x, aa.mean(0), yerr=err, marker=marker, capsize=3, linestyle=style, color=color, label=name)
    ax.set(xlabel="stage (tasks learned)", ylabel="average accuracy over tasks seen (%)", title="AA after each stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    aa_png = docs / "continual-aa.png"
    fig.savefig(aa_png, dpi=120)
    plt.close(fig)

    n = len(by_config)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, by_config.items(), strict=False):
        tasks = recs[0]["tasks"]
        nan = [[[np.nan if v is None else v for v in row] for row in r["matrix"]] for r in recs]
        with warnings.catch_warnings():  # the cells above the diagonal are NaN in every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmean(nan, axis=0) * 100
        mask = np.tril(np.ones_like(m, dtype=bool))
        ax.imshow(np.where(mask, m, np.nan), vmin=0, vmax=100, cmap="viridis")
        for (t, i), v in np.ndenumerate(m):
            if mask[t, i]:
                ax.text(i, t, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)), [t[:6] for t in tasks], rotation=60, fontsize=7)
        ax.set_yticks(range(len(tasks)), [f"after {t + 1}" for t in range(len(tasks))], fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("accuracy (%) on each task (column) after each stage (row), mean over seeds", fontsize=10)
    fig.tight_layout()
    matrix_png = docs / "continual-matrices.png"
    fig.savefig(matrix_png, dpi=120)
    plt.close(fig)
    return [aa_png, matrix_png]


def grid_command(by_config: dict[str, list[dict]], caps: dict) -> str:
    """The command that trains every (configuration, seed) reported here (resumable: each pair once)."""
    seeds = sorted({r["seed"] for recs in by_config.values() for r in recs})
    return (
        f"python benchmarks/continual.py --configs '{','.join(by_config)}' --seeds {','.join(map(str, seeds))} "
        f"--steps {caps['steps']} --batch {caps['batch']} --eval {caps['eval']}"
    )


def report(out: Path, docs: Path) -> str:
    by_config = load_results(out)
    if not by_config:
        return f"no results in {out} yet"
    any_rec = next(iter(by_config.values()))[0]
    caps = any_rec["caps"]
    loads = [r[k] for recs in by_config.values() for r in recs for k in ("load_before", "load_after")]
    text = "\n".join(
        [
            f"`{grid_command(by_config, caps)}`",
            "",
            f"{any_rec['machine']}; load average {min(loads):.1f}-{max(loads):.1f} during the runs; "
            f"each stage {caps['steps']} steps of {caps['batch']} examples ({order(caps)}); the first {caps['eval']} "
            f"test examples of each task; AA/BWT/FWT/forgetting in points (mean ± std over seeds).",
            "",
            summary_table(by_config),
            "",
            "Each task's accuracy right after it was learned -> after the last stage (mean over seeds):",
            "",
            final_rows(by_config),
            "",
            "The memory a method carried into the last stage (GORP's bases, O-LoRA's earlier A rows, ...):",
            "",
            memory_lines(by_config),
            "",
            "How much of each stage's gradient energy the task memory removed (mean over the matrices, largest in "
            "brackets):",
            "",
            removal_lines(by_config),
            "",
            "Where an accuracy fell by 20 points or more after a later stage, and what the model answered then:",
            "",
            drops(by_config),
            "",
        ]
    )
    (out / "summary.md").write_text(text)
    plots(by_config, docs)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", default=str(ROOT / "examples" / "wordnet6.yaml"))
    p.add_argument("--configs", default=",".join(METHODS), help="method or method:key=value;key=value, comma-separated")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per stage")
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--eval", type=int, default=40, help="test examples scored per task")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--work", default=None, help="run folders and the tokenized cache (default: a temp folder)")
    p.add_argument("--report", action="store_true", help="only the report from the results so far")
    opts = p.parse_args()

    from pipelines.spec import load_stream

    out, docs = Path(opts.out), Path(opts.docs)
    out.mkdir(parents=True, exist_ok=True)
    if not opts.report:
        base = load_stream(opts.stream).model_dump(mode="json")
        work = Path(opts.work or Path(os.environ.get("TMPDIR", "/tmp")) / "gorp-continual")
        pairs = [(c, int(s)) for s in opts.seeds.split(",") for c in opts.configs.split(",")]
        for i, (name, seed) in enumerate(pairs, 1):
            path = out / f"{safe(name)}-seed{seed}.json"
            if path.exists():
                print(f"[{i}/{len(pairs)}] {name} seed {seed}: done before ({path.name})", flush=True)
                continue
            print(f"[{i}/{len(pairs)}] {name} seed {seed}: training {len(base['tasks'])} stages ...", flush=True)
            rec = run_pair(base, name, seed, opts, work)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=1))
            tmp.replace(path)
            s = rec["summary"]
            print(
                f"[{i}/{len(pairs)}] {name} seed {seed}: AA {s['aa'] * 100:.1f}, BWT {s['bwt'] * 100:.1f} "
                f"in {rec['wall_s']:.0f} s",
                flush=True,
            )
    print(report(out, docs))


if __name__ == "__main__":
    main()
