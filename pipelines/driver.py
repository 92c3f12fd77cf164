"""The continual driver: the stages of a stream on one Ray Train worker group, recorded in MLflow as they complete.

    results = run_stream(load_stream("examples/quickstart.yaml"))

1. Resolve the model, start Ray, prepare every task with Ray Data (bad input fails here, before anything is trained or
   recorded).
2. Open the sequence in MLflow (a parent run; with ``resume`` the existing one, and its completed stages are skipped).
3. One ``TorchTrainer.fit()`` walks the remaining stages (``pipelines.stage.sequence_loop``): one worker-group start-up
   for the whole sequence instead of one per stage. The Train run's name is fixed per sequence, so a killed driver that
   resumes continues the interrupted stage from its last checkpoint.
4. While the fit runs, the driver follows rank 0's files: the progress of the current stage, and each completed
   stage's ``stage.json``, which it records at once (child run, metrics, data digests, a registered model version,
   the champion alias through the promotion gate), with ``results.json``, ``heatmap.png`` and ``forgetting.png``.
   A stage that fails is recorded as FAILED; it creates no version and moves no alias.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pipelines.stage import PROGRESS_FILE, STAGE_FILE, sequence_loop


class StageFailed(RuntimeError):
    """A stage failed; earlier stages stay recorded and promotable."""


class SequenceExists(RuntimeError):
    """An interrupted sequence with the same configuration exists: resume it or restart explicitly."""


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def init_ray(num_cpus: int | None = None) -> float:
    """Start (or attach to) Ray; returns the seconds it took. The dashboard listens on loopback only."""
    import ray

    t = time.perf_counter()
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`, or by hand) attaches to that cluster; otherwise always a fresh local
        # one, never whichever other Ray instance happens to run on this machine
        address = None if os.environ.get("RAY_ADDRESS") else "local"
        if address == "local":
            # Train V2's preemption watcher (an actor polling for nodes about to be taken away) has nothing to watch on
            # the one machine that also runs this driver; idle, it still wakes ~160 times a second on the cores the
            # training uses (benchmarks/proc_activity.py). Passed on to the controller by fit(); a user's value wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address=address, num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=False)
        import logging

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return time.perf_counter() - t


def _warm_imports() -> threading.Thread:
    """Import what the driver needs after Ray is up (the tokenizer, MLflow, the plots) in a thread, while
    ``ray.init`` runs: it spends much of its seconds waiting for Ray's processes, and leaves a core idle meanwhile."""

    def run() -> None:
        import matplotlib.pyplot  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401

        import pipelines.lineage  # noqa: F401  (mlflow)

    thread = threading.Thread(target=run, name="gorp-warm-imports", daemon=True)
    thread.start()
    return thread


# Ray Train's controller polls its workers this often (Ray's default: 2 s). A finished stage loop, and the end of the
# fit, are noticed only at the next poll: on short stages the default costs seconds for nothing. An explicit
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment wins.
CONTROLLER_POLL_S = "0.5"


class _Fit(threading.Thread):
    """``trainer.fit()`` in a thread, so that the driver can follow and record the stages meanwhile."""

    def __init__(self, trainer):
        super().__init__(daemon=True)
        self.trainer, self.error, self.result = trainer, None, None

    def run(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            self.error = e


def run_stream(
    stream,
    *,
    method: str | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    console=None,
) -> dict[str, Any]:
    """Train the stream's tasks in order; returns the results dict (also ``<run_dir>/results.json``)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pipelines.data import cap_eval_set, prepare_stream
    from pipelines.demo_model import resolve_model
    from pipelines.lineage import DataRef, Lineage, quiet_mlflow_logs, tracking_uri_for
    from pipelines.report import plot_forgetting, plot_heatmap, render_table, write_results

    console = console or Console()
    method = method or stream.method
    method_args = stream.method_args if method == stream.method else {}
    run_dir = Path(run_dir or stream.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {"stages": []}
    model_dir = resolve_model(stream.model, console=console)
    warm = _warm_imports()
    timings["ray_start_s"] = init_ray()
    warm.join()

    t0 = time.perf_counter()
    with console.status("preparing data (Ray Data: read, validate, tokenize, cache) ..."):
        prepared = prepare_stream(stream, model_dir, run_dir)
    timings["data_s"] = time.perf_counter() - t0
    names = [task.name for task in stream.tasks]
    n_tasks = len(names)
    eval_sets = {p.name: cap_eval_set(p.eval_set, stream.training.max_eval_examples) for p in prepared}

    t0 = time.perf_counter()
    quiet_mlflow_logs()
    ml = stream.mlflow
    tracking_uri = tracking_uri_for(run_dir, ml.tracking_uri)
    lin = Lineage(tracking_uri, ml.experiment, aa_tolerance=ml.aa_tolerance, new_task_floor=ml.new_task_floor)
    resolved = {**stream.model_dump(mode="json"), "method": method, "method_args": method_args}
    chash = config_hash(resolved)
    existing = None if restart else lin.find_sequence(stream.name, chash)
    done = lin.completed_stages(existing) if existing is not None else {}
    if existing is not None and not resume:
        if len(done) < n_tasks:
            raise SequenceExists(
                f"{stream.name}: an interrupted sequence with this configuration exists (MLflow run {existing} at "
                f"{tracking_uri}); continue it with `gorp run --resume`, or start a new one with `--restart`"
            )
        resume = True  # complete: the resume path below says so and does nothing
    parent = lin.start_sequence(stream.name, chash, resolved, resume=resume and existing is not None)
    start = 0
    while start in done:
        start += 1
    matrix = [[done[t].row.get(n) for n in names] for t in range(start)]
    zero_shot: list[float | None] = [done[0].zero_shot.get(n) for n in names] if start else [None] * n_tasks
    stages: list[dict[str, Any]] = []
    seq_dir = run_dir / "sequences" / parent[:8]
    stage_dirs = [seq_dir / f"{t:02d}-{n}" for t, n in enumerate(names)]
    results: dict[str, Any] = {}
    if start == n_tasks:
        console.print(f"[green]sequence {stream.name} ({parent[:8]}) is complete: {n_tasks} stages; nothing to do")
        lin.finish_sequence(parent)
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
        return results
    if start:
        console.print(f"resuming {stream.name} ({parent[:8]}) at stage {start + 1}/{n_tasks}: {names[start]}")
        prev_json = run_dir / "results.json"
        stages = json.loads(prev_json.read_text())["stages"][:start] if prev_json.exists() else []

    sc, tc = stream.scaling, stream.training
    steps = [tc.max_steps or max(1, tc.epochs * p.n_train // tc.batch_size) for p in prepared]
    prevs = [Path(model_dir)] + [d / "model" for d in stage_dirs[:-1]]
    if start:
        prevs[start] = done[start - 1].folder or prevs[start]
    config = {
        "method": method,
        "method_args": method_args,
        "training": tc.model_dump(mode="json"),
        "seed": tc.seed,
        "fsdp": sc.fsdp,
        "threads": sc.cpus_per_worker,
        "trust_remote_code": stream.trust_remote_code,
        "eval_sets": eval_sets,
        "eval_batch_size": tc.eval_batch_size,
        "faults": json.loads(os.environ.get("GORP_FAULTS", "{}")),  # fault injection for recovery tests
        "stages": [
            {
                "stage": t,
                "task": names[t],
                "dataset": f"train_{t}",
                "prev_dir": str(prevs[t]),
                "out_dir": str(stage_dirs[t] / "model"),
                "steps": steps[t],
                "pad_token_id": prepared[t].split.pad_token_id,
                "eval_tasks": names[: t + 2],  # every task seen so far, and the next one (forward transfer)
                "zero_shot_tasks": names if t == 0 else [],
            }
            for t in range(start, n_tasks)
        ],
    }
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)  # read by fit(), passed on
    trainer = TorchTrainer(
        sequence_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker={"CPU": sc.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=f"{stream.name}-{chash}-{parent[:8]}",  # deterministic: a resumed driver finds the checkpoints
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={f"train_{t}": prepared[t].train for t in range(start, n_tasks)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every worker reads all; see pipelines.stage
    )
    timings["bookkeeping_s"] = time.perf_counter() - t0

    def stage_params(t: int) -> dict[str, Any]:
        return {"method": method, "steps": steps[t], "num_workers": sc.num_workers, "fsdp": sc.fsdp}

    def record(t: int) -> None:
        """Everything the driver does when stage t completes."""
        nonlocal results, zero_shot
        rec = json.loads((stage_dirs[t] / "model" / STAGE_FILE).read_text())
        if t == 0:
            zero_shot = [rec["zero_shot"].get(n) for n in names]
        matrix.append([rec["row"].get(n) for n in names])
        stages.append(
            {"task": names[t], "train_s": rec["train_s"], "eval_s": rec["eval_s"], "tokens_per_s": rec["tokens_per_s"]}
        )
        results = write_results(run_dir, names, matrix, zero_shot, stages)
        plot_heatmap(run_dir / "heatmap.png", names, matrix)
        plot_forgetting(run_dir / "forgetting.png", names, matrix, zero_shot)
        lin.log_step_metrics(run_ids[t], [{"step": i + 1, "loss": v} for i, v in enumerate(rec["losses"])])
        summary = {k: results[k] for k in ("aa", "bwt", "fwt", "forgetting")}
        task = stream.tasks[t]
        data = [DataRef(f"{names[t]}/{s}", str(p), prepared[t].digests[s], s) for s, p in task.sources().items()]
        lin.log_stage_result(
            run_ids[t],
            {n: v for n, v in zip(names, matrix[-1], strict=True)},
            summary,
            run_dir / "heatmap.png",
            data,
            zero_shot={n: v for n, v in zip(names, zero_shot, strict=True)} if t == 0 else None,
        )
        version = lin.register_stage(
            run_ids[t],
            stream.name,
            stage_dirs[t] / "model",
            {"method": method, "data_digest": prepared[t].digests["train"], "config_hash": chash},
        )
        lin.finish_stage(run_ids[t])
        timings["stages"].append({"stage": t, "train_s": rec["train_s"], "eval_s": rec["eval_s"]})
        console.print(f"stage {t + 1}/{n_tasks} {names[t]}: registered {stream.name} version {version}")

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}")]
    columns += [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    run_ids: dict[int, str] = {start: lin.start_stage(parent, start, names[start], stage_params(start))}
    current, seen = start, 0
    t_fit = time.perf_counter()
    fit = _Fit(trainer)
    # the driver shares the cores with the training worker (and, at nice 0, preempts it): a step takes seconds on
    # CPU, so four redraws a second and a poll every half second lose nothing a user sees
    with Progress(*columns, console=console, refresh_per_second=4) as bar:
        bars = {start: bar.add_task(f"stage {start + 1}/{n_tasks}: {names[start]}", total=steps[start], info="start")}
        fit.start()
        while current < n_tasks:
            alive = fit.is_alive()
            progress = stage_dirs[current] / PROGRESS_FILE
            if progress.exists():
                lines = progress.read_text().splitlines()
                for line in lines[seen:]:
                    r = json.loads(line)
                    info = f"loss {r['loss']:.3f}  {r['tokens_per_s']:.0f} tok/s"
                    bar.update(bars[current], completed=r["step"], info=info)
                seen = len(lines)
            if (stage_dirs[current] / "model" / STAGE_FILE).exists():
                bar.update(bars[current], info="done")
                record(current)
                current, seen = current + 1, 0
                if current < n_tasks:
                    run_ids[current] = lin.start_stage(parent, current, names[current], stage_params(current))
                    bars[current] = bar.add_task(
                        f"stage {current + 1}/{n_tasks}: {names[current]}", total=steps[current], info="start"
                    )
                continue
            if not alive:
                break
            time.sleep(0.5)
        fit.join()
    timings["fit_s"] = time.perf_counter() - t_fit
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    if current < n_tasks:
        err = fit.error
        text = "".join(traceback.format_exception(err)) if err else "the worker group ended before the stage completed"
        lin.finish_stage(run_ids[current], "FAILED", error=text)
        lin.finish_sequence(parent, "FAILED")
        cause = getattr(err, "__cause__", None) or err
        raise StageFailed(
            f"stage {current + 1}/{n_tasks} ({names[current]}) failed: {str(cause).strip()[-2000:]}\n"
            + (f"stages 1-{current} stay recorded and promotable; " if current else "")
            + f"`gorp run --resume` continues from stage {current + 1}"
        ) from err
    lin.finish_sequence(parent)
    console.print(render_table(names, matrix, zero_shot, {k: results[k] for k in ("aa", "bwt", "fwt", "forgetting")}))
    return results
