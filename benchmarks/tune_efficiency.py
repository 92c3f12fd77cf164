"""Early stopping against running every configuration to the end, on the same 8-point space of the quickstart stream.

    python benchmarks/tune_efficiency.py [--stream examples/quickstart.yaml] [--steps 4] [--eval 12] [--json out]
        [--schedulers grid,halving:3,asha:2] [--reference grid_row.json]
    python benchmarks/tune_efficiency.py --tiny      # the tests' tiny stream (3 tasks, 12 steps): minutes, not hours

Every search runs ``tuning.run.tune_stream`` on the same stream (each stage capped at --steps optimizer steps, each
task scored on its first --eval validation examples; the quickstart's tasks have no validation split, so 20% of each
task's training rows are held out, seed 0) over the same grid: lr x full_rank_lr x rank, 2 x 2 x 2 = 8 points.
The exhaustive search (``grid``) trains all 8 x 3 stages; ``halving:R`` (synchronous successive halving, a rung at
every stage, grace period 1, reduction factor R) and ``asha:R`` (Ray's asynchronous version, the stage index as its
time axis) stop trials at stage boundaries. Printed: the stage-trainings each spent, the best objective (AA after the
last stage, on validation) each found, their wall times and the machine's load. Target: within 2 points of the
exhaustive best with at most half the stage-trainings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACE = {
    "lr": {"grid": [1.0e-4, 1.0e-3]},
    "full_rank_lr": {"grid": [1.0e-5, 1.0e-4]},
    "rank": {"grid": [4, 8]},
}
TINY_SPACE = {  # the tiny stream learns a task in 12 steps at lr 0.05 (tests/pipeline_fixtures.py), not at 1e-4
    "lr": {"grid": [1.0e-4, 0.05]},
    "full_rank_lr": {"grid": [1.0e-5, 0.02]},
    "rank": {"grid": [4, 8]},
}


def capped_stream(stream_path: Path, steps: int, eval_examples: int, run_dir: Path) -> Path:
    """The stream with capped steps and evaluation, written next to nothing else (paths made absolute)."""
    from pipelines.spec import load_stream

    data = load_stream(stream_path).model_dump(mode="json")
    data["training"] |= {"max_steps": steps, "max_eval_examples": eval_examples}
    data["run_dir"] = str(run_dir)
    path = run_dir.parent / "stream.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_stream(out: Path) -> Path:
    """The tests' tiny stream: a word-level LLaMA, three tasks, one worker on 0.9 CPU (two trials at once on 2)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pipeline_fixtures import make_stream

    return make_stream(out / "tiny", num_workers=1, fsdp=False, scaling={"cpus_per_worker": 0.9})


def search(stream: Path, scheduler: str, out: Path, space: dict, concurrency: int) -> dict:
    from tuning.run import tune_stream

    kind, _, rate = scheduler.partition(":")
    name = scheduler.replace(":", "-")
    spec = {"name": name, "space": space, "num_samples": 1, "seed": 0, "concurrency": concurrency}
    spec["scheduler"] = {"kind": kind, "grace_period": 1, "reduction_factor": float(rate or 2)}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    outcome = tune_stream(stream, path, out_dir=out / name, echo=lambda s: print(s, flush=True))
    return {
        "scheduler": scheduler,
        "stage_trainings": sum(t["stages"] for t in outcome.trials),
        "trials": len(outcome.trials),
        "best_objective": outcome.best["objective"] if outcome.best else None,
        "best_config": outcome.best["config"] if outcome.best else None,
        "wall_s": round(time.perf_counter() - t0, 1),
        "per_trial": [{k: t[k] for k in ("config", "aa", "stages", "stopped")} for t in outcome.trials],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream", default=str(Path(__file__).resolve().parents[1] / "examples/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eval", type=int, default=12)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny stream instead (steps/eval ignored)")
    parser.add_argument("--schedulers", default="grid,halving:3,asha:2", help="kind[:rate], comma-separated; grid too")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--reference", default=None, help="an exhaustive search row (a JSON line printed here), not grid"
    )
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="tune_efficiency-"))
    if args.tiny:
        stream, space, concurrency = tiny_stream(out), TINY_SPACE, 2
        args.stream, args.steps, args.eval = "tests/pipeline_fixtures.make_stream (tiny)", 12, None
    else:
        stream, space, concurrency = capped_stream(Path(args.stream), args.steps, args.eval, out / "run"), SPACE, 1
    if "grid" not in args.schedulers.split(",") and not args.reference:
        parser.error("--schedulers must include grid, or --reference name an earlier grid row: the exhaustive search")
    load_before = os.getloadavg()
    rows = [json.loads(Path(args.reference).read_text())] if args.reference else []
    for scheduler in args.schedulers.split(","):
        rows.append(search(stream, scheduler, out, space, concurrency))
        print(json.dumps(rows[-1], default=str), flush=True)  # each search's figures as soon as it ends
    grid = next(r for r in rows if r["scheduler"] == "grid")
    for r in rows:
        r["stage_training_ratio"] = round(r["stage_trainings"] / grid["stage_trainings"], 3)
        r["objective_gap_points"] = round(100 * (grid["best_objective"] - r["best_objective"]), 2)
    report = {
        "stream": args.stream,
        "steps_per_stage": args.steps,
        "eval_examples": args.eval,
        "space_points": 8,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "searches": rows,
    }
    print(f"\n{'search':<12}{'stage-trainings':>17}{'best objective':>16}{'gap (points)':>14}{'wall s':>9}")
    for r in rows:
        print(
            f"{r['scheduler']:<12}{r['stage_trainings']:>11} ({r['stage_training_ratio']:.0%})"
            f"{r['best_objective']:>16.4f}{r['objective_gap_points']:>+14.2f}{r['wall_s']:>9.0f}"
        )
    print(
        f"Target: <= 50% of the exhaustive stage-trainings and <= 2 points below its best. Load average before/after: "
        f"{load_before[0]:.1f} / {report['load_after'][0]:.1f} on {os.cpu_count()} cores."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
