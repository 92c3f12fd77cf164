"""What the Ray pipeline costs next to a plain single-process PyTorch loop doing the same training and evaluation.

    python benchmarks/pipeline_overhead.py [--stream examples/quickstart.yaml] [--steps N] [--eval N] [--repeat 3]
                                           [--json out]

--steps and --eval default to the stream's own caps (the quickstart: 30 steps per stage, 80 test examples per task);
--threads N sets the torch threads of both sides (the stream's cpus_per_worker, 2 in the quickstart).

Both sides train the same tasks for the same steps on the same batches (file order) with the same method, and score
the same test examples (zero-shot once, then every task seen so far and the next after each stage). Each side runs as
its own fresh Python process, as a user runs ``gorp run`` or a script, and is timed from the process's start to its
end: interpreter start and imports count on both sides. The pipeline's wall time is split into process start
(interpreter, imports), Ray start, data preparation (Ray Data), bookkeeping (MLflow, driver), worker start-up and
teardown, stage setup (load, adapters, optimizer), training, finalize (merge + save) and evaluation; it prints the
ratio of the totals. Model preparation (the demo model's conversion) is done before either side is timed.

A 2-core machine shared with other tenants varies by about 10% from run to run in the same code, as much as the
target leaves room for: ``--repeat N`` runs N pairs, alternating which side goes first, and prints the median ratio
with each pair's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(stream, model_dir: Path, steps: int, cap: int) -> dict[str, float]:
    """The same work without Ray or MLflow: tokenize in-process, train, merge, evaluate."""
    import pyarrow as pa
    import torch

    from gorp.loop import train_step
    from gorp.methods import build_method
    from gorp.models import load_model
    from pipelines.data import cap_eval_set, load_eval_set
    from pipelines.encoding import Encoder
    from pipelines.evaluate import evaluate_task
    from pipelines.feeding import PadCollate
    from pipelines.records import BadRecord, format_prompt, scan_records

    torch.set_num_threads(int(stream.scaling.cpus_per_worker))
    out = {"data_s": 0.0, "setup_s": 0.0, "train_s": 0.0, "finalize_s": 0.0, "eval_s": 0.0, "train_s_by_stage": []}
    t = time.perf_counter()
    model, tok = load_model(model_dir)
    batches, evals = [], {}
    for task in stream.tasks:
        enc = Encoder(tok, max_source_tokens=task.max_source_tokens, max_target_tokens=task.max_target_tokens)
        recs = [
            r for r in scan_records(task.train, task.columns.model_dump(), task.labels) if not isinstance(r, BadRecord)
        ]
        ex = enc.examples(
            [format_prompt(r["instruction"], r["input"], task.labels) for r in recs], [r["output"] for r in recs]
        )
        table = pa.table({"input_ids": ex["input_ids"], "labels": ex["labels"]})
        collate, bs = PadCollate(tok.pad_token_id), stream.training.batch_size
        batches.append([collate(table.slice(i * bs, bs)) for i in range(steps)])
        evals[task.name] = cap_eval_set(load_eval_set(task, tempfile.mkdtemp()), cap)  # as the pipeline does
    out["data_s"] = time.perf_counter() - t
    names = [task.name for task in stream.tasks]

    def evaluate(m, which):
        t0 = time.perf_counter()
        for n in which:
            e = evals[n]
            evaluate_task(
                m,
                tok,
                e["prompts"],
                e["answers"],
                metric=e["metric"],
                labels=e["labels"],
                batch_size=stream.training.eval_batch_size,
                max_prompt_tokens=e["max_prompt_tokens"],
            )
        out["eval_s"] += time.perf_counter() - t0

    evaluate(model, names)
    method = build_method(stream.method, **stream.method_args)
    for t_idx in range(len(names)):
        t0 = time.perf_counter()
        torch.manual_seed(stream.training.seed + t_idx)
        model = method.setup_task(model, t_idx, batches=lambda t_idx=t_idx: iter(batches[t_idx][:8]))
        opt = method.make_optimizer(model)
        out["setup_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        model.train()
        for b in batches[t_idx]:
            train_step(model, method, opt, b, stream.training.grad_clip)
        out["train_s_by_stage"].append(time.perf_counter() - t0)
        out["train_s"] += out["train_s_by_stage"][-1]
        t0 = time.perf_counter()
        method.end_task(model, opt)
        model = method.finalize(model)
        folder = Path(tempfile.mkdtemp()) / "model"
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        method.save(folder)
        out["finalize_s"] += time.perf_counter() - t0
        evaluate(model, names[: t_idx + 2])
    return out


def pipeline_run(stream, console) -> dict[str, float]:
    """``gorp run`` (``run_stream``) on a fresh run directory (empty cache); its wall time in parts."""
    from pipelines.run import run_stream

    run_dir = Path(tempfile.mkdtemp(prefix="gorp-overhead-"))
    result = run_stream(stream, run_dir=run_dir, restart=True, console=console)
    stages = [s.timings for s in result.stages]
    parts = {k: sum(s.get(k, 0.0) for s in stages) for k in ("setup_s", "train_s", "finalize_s", "eval_s")}
    parts["eval_s"] += sum(s.get("zero_shot_s", 0.0) for s in stages)
    return {
        "ray_start_s": result.timings["ray_start_s"],
        "data_s": result.timings["data_s"],
        "bookkeeping_s": 0.0,  # timed_side adds the rest of run_stream's time (MLflow, plots, the driver)
        "worker_start_s": result.timings["fit_s"] - sum(parts.values()),  # start-up and teardown of the worker group
        **parts,
        "train_s_by_stage": [s["train_s"] for s in stages],
    }


PARTS = (
    "process_start_s",
    "ray_start_s",
    "data_s",
    "bookkeeping_s",
    "worker_start_s",
    "setup_s",
    "train_s",
    "finalize_s",
    "eval_s",
)


def one_side(args) -> None:
    """Run one side in this process (a child of ``main``); write its parts and its running time as JSON."""
    from pipelines.spec import load_stream

    stream = load_stream(args.stream)
    stream.training.max_steps = args.steps
    stream.training.max_eval_examples = args.eval
    if args.threads:
        stream.scaling.cpus_per_worker = args.threads  # the worker's CPUs and torch threads; the plain loop's threads
    if args.side == "pipeline":
        from rich.console import Console

        from pipelines.demo_model import resolve_model

        resolve_model(stream.model)
        t = time.perf_counter()
        parts = pipeline_run(stream, Console(width=130, stderr=True))
    else:
        from pipelines.demo_model import resolve_model

        model_dir = resolve_model(stream.model)
        t = time.perf_counter()
        parts = plain_loop(stream, model_dir, args.steps, args.eval)
    parts["run_s"] = time.perf_counter() - t
    Path(args.out).write_text(json.dumps(parts))


def timed_side(side: str, args) -> dict[str, float]:
    """Spawn a fresh process for one side; its parts, with process start = wall time - what the parts cover."""
    out = Path(tempfile.mkstemp(suffix=f"-{side}.json")[1])
    cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--stream", args.stream]
    cmd += ["--steps", str(args.steps), "--eval", str(args.eval)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    parts = json.loads(out.read_text())
    covered = sum(parts.get(k, 0.0) for k in PARTS[1:])
    if side == "pipeline":  # what run_stream did besides the parts (MLflow, plots, the table) is bookkeeping
        parts["bookkeeping_s"] += max(0.0, parts["run_s"] - covered)
        parts["process_start_s"] = wall - parts["run_s"]
    else:  # a plain script: everything but its parts is interpreter start and imports
        parts["process_start_s"] = wall - covered
    parts["total_s"] = wall
    return parts


def run_pairs(args, console) -> list[dict]:
    """``--repeat`` pairs of fresh-process runs, the order alternating; each pair's parts and its ratio."""
    pairs = []
    for i in range(args.repeat):
        pair: dict = {}
        for side in ("plain", "pipeline") if i % 2 else ("pipeline", "plain"):
            with console.status(f"pair {i + 1}/{args.repeat}: {side} ..."):
                pair[side] = timed_side(side, args)
        pair["ratio"] = pair["pipeline"]["total_s"] / pair["plain"]["total_s"]
        console.print(
            f"pair {i + 1}/{args.repeat}: pipeline {pair['pipeline']['total_s']:.1f} s, plain loop "
            f"{pair['plain']['total_s']:.1f} s: {pair['ratio']:.3f}x"
        )
        pairs.append(pair)
    return pairs


def print_summary(console, stream, args, pairs: list[dict]) -> None:
    """The medians of each part, training by stage, the pipeline / plain ratio; ``--json`` writes the pairs."""
    import statistics

    from rich.table import Table

    def med(side: str, key: str) -> float | None:
        values = [p[side][key] for p in pairs if key in p[side]]
        return statistics.median(values) if values else None

    title = f"{stream.name}: {len(stream.tasks)} stages x {args.steps} steps, {args.eval} test examples/task"
    if args.threads:
        title += f", {args.threads} torch thread(s) a side"
    if args.repeat > 1:
        title += f" (medians of {args.repeat} pairs)"
    table = Table(title=title)
    for col in ("part", "pipeline s", "plain loop s"):
        table.add_column(col, justify="right")
    for key in (*PARTS, "total_s"):
        plain_value = med("plain", key)
        bold = "[bold]" if key == "total_s" else ""
        table.add_row(
            bold + key[:-2],
            f"{bold}{med('pipeline', key):.1f}",
            "-" if plain_value is None else f"{bold}{plain_value:.1f}",
        )
    console.print(table)
    for side in ("pipeline", "plain"):
        by_stage = [statistics.median(v) for v in zip(*(p[side]["train_s_by_stage"] for p in pairs), strict=True)]
        console.print(f"train by stage, {side}: " + ", ".join(f"{v:.1f} s" for v in by_stage))
    ratios = [p["ratio"] for p in pairs]
    ratio = statistics.median(ratios)
    spread = f" (pairs: {', '.join(f'{r:.3f}' for r in ratios)})" if len(ratios) > 1 else ""
    console.print(f"pipeline / plain loop: {ratio:.3f}x{spread} (target <= 1.15x)")
    if args.json:
        args.json.write_text(json.dumps({"pairs": pairs, "ratio": ratio, "ratios": ratios}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default="examples/quickstart.yaml")
    ap.add_argument("--steps", type=int, help="training steps per stage, both sides (default: the stream's cap)")
    ap.add_argument("--eval", type=int, help="test examples per task, both sides (default: the stream's cap)")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads on both sides (the stream's cpus_per_worker); fewer than the cores leaves Ray's own "
        "processes a core of their own",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="pairs of runs, the order alternating (plain first in even pairs)"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--side", choices=("pipeline", "plain"), help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        one_side(args)
        return

    from rich.console import Console

    from pipelines.demo_model import resolve_model
    from pipelines.spec import load_stream

    console = Console(width=130)
    stream = load_stream(args.stream)
    args.steps = stream.training.max_steps if args.steps is None else args.steps
    args.eval = stream.training.max_eval_examples if args.eval is None else args.eval
    if args.steps is None or args.eval is None:
        ap.error("the stream caps neither steps nor test examples: give --steps and --eval")
    resolve_model(stream.model, console=console)  # prepared before anything is timed

    pairs = run_pairs(args, console)
    print_summary(console, stream, args, pairs)


if __name__ == "__main__":
    main()
