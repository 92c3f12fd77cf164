"""A continual sequence as a library call: the remaining stages of a stream on one Ray Train worker group.

    from pipelines.sequence import run_sequence

    result = run_sequence(load_stream("stream.yaml"), callbacks=[MyListener()], storage="s3://bucket/runs")
    result.matrix, result.summary["aa"], result.stages[-1].model_uri

``run_sequence`` starts (or attaches to) Ray, prepares every task with Ray Data (bad input fails here, before anything
is trained), and runs the stages that are not done yet with one ``TorchTrainer.fit()``. Each stage's result comes back
as it completes, through Ray (a queue that rank 0 writes to; see :mod:`pipelines.worker`), and goes to every callback
in order. Nothing here writes to MLflow or draws on a terminal: those are callbacks (:mod:`pipelines.recorders`,
:mod:`pipelines.lineage`), wired in by ``gorp run``.

Where it starts: a fresh sequence starts from the stream's model; ``history`` (the results of the stream's first k
stages, e.g. a completed sequence this stream extends) continues at stage k from the last one's model and method
state; ``start_from`` (a stage's model folder, local or a URI) starts stage 0 from that folder instead of the base
model. A stage whose ``stage.json`` is already in the run's storage is read back, never trained twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.results import STAGE_FILE, SequenceResult, StageResult


class StageFailed(RuntimeError):
    """A stage failed; earlier stages stay recorded and promotable."""


class Callback:
    """A listener of a sequence; override what you need. Called in the driver process, in this order: ``on_start``,
    then for each stage ``on_stage_start``, ``on_progress`` (every optimizer step), ``on_stage_end``; finally
    ``on_end``, or ``on_failure`` when a stage fails. A stage read back from storage gets ``on_stage_start`` and
    ``on_stage_end`` only."""

    def on_start(self, plan: SequencePlan) -> None: ...

    def on_stage_start(self, plan: SequencePlan, stage: int) -> None: ...

    def on_progress(self, plan: SequencePlan, stage: int, row: dict[str, float]) -> None: ...

    def on_stage_end(self, plan: SequencePlan, result: StageResult) -> None: ...

    def on_end(self, plan: SequencePlan, result: SequenceResult) -> None: ...

    def on_failure(self, plan: SequencePlan, stage: int, error: BaseException | None) -> None: ...


@dataclass
class SequencePlan:
    """What ``run_sequence`` is about to do, as its callbacks see it."""

    stream: Any  # pipelines.spec.Stream
    method: str
    method_args: dict[str, Any]
    sequence_id: str
    storage: str  # the run's storage root: a local folder or a URI
    tasks: list[str]
    steps: list[int]  # optimizer steps of each stage
    start: int  # the first stage to run
    history: list[StageResult]  # the stages before ``start``
    prepared: list[Any]  # pipelines.data.PreparedTask of every task (data digests, sources)
    stage_uris: list[str]  # where each stage's model folder goes
    timings: dict[str, float] = field(default_factory=dict)

    def result(self, stages: Sequence[StageResult]) -> SequenceResult:
        return SequenceResult(self.stream.name, self.sequence_id, self.tasks, list(self.history) + list(stages))


def identity(stream, method: str | None = None, start_from: str | None = None) -> str:
    """A sequence's identity: its configuration *without* the task list (12 hex), so that a stream with a task
    appended continues the same sequence. The tasks' data are checked separately (:func:`check_history`)."""
    config = stream.model_dump(mode="json", exclude={"tasks", "run_dir", "mlflow"})
    config |= {"method": method or stream.method, "start_from": start_from}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_history(stream, history: Sequence[StageResult], digests: Sequence[dict[str, str]] | None = None) -> None:
    """The stream's first tasks must be the history's, in order, with the same training data when digests are
    given; raises ValueError naming the first difference."""
    names = [t.name for t in stream.tasks]
    if len(history) > len(names):
        raise ValueError(f"the sequence already has {len(history)} stages; the stream lists only {len(names)} tasks")
    for t, past in enumerate(history):
        if past.task != names[t]:
            raise ValueError(
                f"stage {t + 1} of the sequence trained {past.task!r}; the stream's task {t + 1} is "
                f"{names[t]!r}. Tasks can be appended to a sequence, not changed or reordered"
            )
        if digests is not None and past.data_digests.get("train") not in (None, digests[t].get("train")):
            raise ValueError(
                f"task {names[t]!r}: its training data changed since stage {t + 1} was trained "
                f"(sha256 {past.data_digests['train'][:12]} -> {digests[t]['train'][:12]})"
            )


def init_ray(num_cpus: int | None = None) -> float:
    """Start (or attach to) Ray; returns the seconds it took. The dashboard listens on loopback only."""
    import logging

    import ray
    import ray.data

    t = time.perf_counter()
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`, or by hand) attaches to that cluster; otherwise always a fresh local
        # one, never whichever other Ray instance happens to run on this machine
        address = None if os.environ.get("RAY_ADDRESS") else "local"
        if address == "local":
            # Train V2's preemption watcher has nothing to watch on the one machine that also runs this driver; idle,
            # it still wakes ~160 times a second on the training cores (benchmarks/proc_activity.py). A user's value
            # wins; fit() passes it on to the controller.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address=address, num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return time.perf_counter() - t


# Ray Train's controller polls its workers this often (Ray's default: 2 s). A finished stage loop, and the end of the
# fit, are noticed only at the next poll. An explicit RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the environment wins.
CONTROLLER_POLL_S = "0.5"


class _Fit(threading.Thread):
    """``trainer.fit()`` in a thread, so that the driver can hand the stages to the callbacks meanwhile."""

    def __init__(self, trainer):
        super().__init__(daemon=True)
        self.trainer, self.error, self.result = trainer, None, None

    def run(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            self.error = e


def _stage_uri(root: str, sequence_id: str, t: int, task: str) -> str:
    return storage.join(root, "sequences", sequence_id, f"{t:02d}-{task}", "model")


def _worker_config(plan: SequencePlan, eval_sets: dict, base_uri: str, channel, hooks) -> dict[str, Any]:
    """The ``train_loop_config`` of the fit: plain data (and the channel's actor handle)."""
    stream, names, t0 = plan.stream, plan.tasks, plan.start
    prevs = [base_uri] + plan.stage_uris[:-1]
    if plan.history:
        prevs[t0] = plan.history[-1].model_uri
    return {
        "method": plan.method,
        "method_args": plan.method_args,
        "training": stream.training.model_dump(mode="json"),
        "seed": stream.training.seed,
        "fsdp": stream.scaling.fsdp,
        "threads": stream.scaling.cpus_per_worker,
        "trust_remote_code": stream.trust_remote_code,
        "eval_sets": eval_sets,
        "eval_batch_size": stream.training.eval_batch_size,
        "channel": channel,
        "hooks": hooks,
        "stages": [
            {
                "stage": t,
                "task": names[t],
                "dataset": f"train_{t}",
                "prev_uri": prevs[t],
                "out_uri": plan.stage_uris[t],
                "steps": plan.steps[t],
                "pad_token_id": plan.prepared[t].split.pad_token_id,
                "train_rows": plan.prepared[t].n_train,
                "eval_tasks": names[: t + 2],  # every task seen so far, and the next one (forward transfer)
                "zero_shot_tasks": names if t == 0 else [],
                "data_digests": plan.prepared[t].digests,
            }
            for t in range(t0, len(names))
        ],
    }


def _trainer(plan: SequencePlan, config: dict[str, Any]):
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.preflight import start_budget
    from pipelines.worker import sequence_loop

    sc, tc = plan.stream.scaling, plan.stream.training
    storage_path, filesystem = storage.ray_storage(storage.join(plan.storage, "ray"))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)  # read by fit(), passed on
    _, start_retries = start_budget()  # a worker group that cannot start ends the fit (Ray: retried forever)
    return TorchTrainer(
        sequence_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker={"CPU": sc.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=f"{plan.stream.name}-{plan.sequence_id}",  # deterministic: a resumed driver finds the checkpoints
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(
                max_failures=tc.max_failures, controller_failure_limit=start_retries
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={f"train_{t}": plan.prepared[t].train for t in range(plan.start, len(plan.tasks))},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every worker reads all; see pipelines.worker
    )


def _notify(callbacks: Sequence[Callback], event: str, *args) -> None:
    for cb in callbacks:
        getattr(cb, event)(*args)


def _follow(plan: SequencePlan, fit: _Fit, channel, callbacks: Sequence[Callback]) -> list[StageResult]:
    """Hand the fit's messages to the callbacks until it ends; returns the stages it completed, in order."""
    from ray.util.queue import Empty

    done: list[StageResult] = []
    _notify(callbacks, "on_stage_start", plan, plan.start)
    fit.start()
    while True:
        alive = fit.is_alive()
        try:
            kind, stage, payload = channel.get(timeout=0.5)
        except Empty:
            if not alive:
                return done
            continue
        if kind == "progress":
            _notify(callbacks, "on_progress", plan, stage, payload)
        elif kind == "stage" and stage == plan.start + len(done):
            result = StageResult.from_dict(json.loads(payload))
            done.append(result)
            _notify(callbacks, "on_stage_end", plan, result)
            if stage + 1 < len(plan.tasks):
                _notify(callbacks, "on_stage_start", plan, stage + 1)


def _read_back(plan: SequencePlan, callbacks: Sequence[Callback]) -> list[StageResult]:
    """Stages from ``plan.start`` on whose ``stage.json`` is already in storage (a driver died after rank 0 finished
    them, before it recorded them): their results, handed to the callbacks; nothing is trained again."""
    out = []
    for t in range(plan.start, len(plan.tasks)):
        if not storage.exists(storage.join(plan.stage_uris[t], STAGE_FILE)):
            break
        result = StageResult.load(plan.stage_uris[t])
        _notify(callbacks, "on_stage_start", plan, t)
        _notify(callbacks, "on_stage_end", plan, result)
        out.append(result)
    return out


def prepare(
    stream,
    *,
    method: str | None = None,
    history: Sequence[StageResult] = (),
    sequence_id: str | None = None,
    start_from: str | None = None,
    storage_root: str | None = None,
    run_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    eval_split: str = "test",
) -> tuple[SequencePlan, str]:
    """Resolve the model, start Ray, prepare the data (bad input fails here); returns the plan and the base model's
    location (the first stage's starting point)."""
    from gorp.methods import build_method
    from pipelines.data import cap_eval_set, prepare_stream
    from pipelines.demo_model import resolve_model

    method = method or stream.method
    build_method(method, **stream.method_args)  # the stream's method_args must fit the method: fail before Ray
    run_dir = Path(run_dir or stream.run_dir).resolve()
    root = storage.normalize(storage_root or run_dir)
    timings: dict[str, float] = {}
    model_dir = resolve_model(stream.model)
    timings["ray_start_s"] = init_ray()
    t0 = time.perf_counter()
    prepared = prepare_stream(stream, model_dir, run_dir, cache_dir=cache_dir, eval_split=eval_split)
    timings["data_s"] = time.perf_counter() - t0
    check_history(stream, history, [p.digests for p in prepared])
    for p in prepared:
        p.eval_set.update(cap_eval_set(p.eval_set, stream.training.max_eval_examples))
    tc, names = stream.training, [t.name for t in stream.tasks]
    sid = sequence_id or identity(stream, method, start_from)
    plan = SequencePlan(
        stream=stream,
        method=method,
        method_args=stream.method_args,
        sequence_id=sid,
        storage=root,
        tasks=names,
        steps=[tc.max_steps or max(1, tc.epochs * p.n_train // tc.batch_size) for p in prepared],
        start=len(history),
        history=list(history),
        prepared=prepared,
        stage_uris=[_stage_uri(root, sid, t, n) for t, n in enumerate(names)],
        timings=timings,
    )
    return plan, start_from or str(model_dir)


def run_sequence(
    stream,
    *,
    method: str | None = None,
    history: Sequence[StageResult] = (),
    start_from: str | None = None,
    sequence_id: str | None = None,
    callbacks: Sequence[Callback] = (),
    storage: str | None = None,
    run_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    hooks: Any = None,
    eval_split: str = "test",
) -> SequenceResult:
    """Train the stream's stages after ``history``; returns every stage's result (history included).

    ``storage``: where stage models, method state and checkpoints go (default: the stream's ``run_dir``; a URI such
    as ``s3://bucket/prefix`` works from any node). ``run_dir``: the driver's local folder (tokenized cache,
    quarantine). ``hooks``: an object with ``after_build(stage, model, method)`` and ``after_step(stage, task, step,
    loss)``, run inside the workers (tests inject faults with it). ``eval_split``: what each stage is scored on, "test"
    or "validation" (a search: :mod:`tuning`). Raises :class:`StageFailed` when a stage fails; the
    stages before it are complete and were handed to the callbacks.
    """
    from ray.util.queue import Queue

    from pipelines.preflight import check_resources

    ray_start_s = init_ray()  # prepare() attaches to it; the worker group must fit before the data is prepared
    check_resources(stream)
    plan, base_uri = prepare(
        stream,
        method=method,
        history=history,
        sequence_id=sequence_id,
        start_from=start_from,
        storage_root=storage,
        run_dir=run_dir,
        cache_dir=cache_dir,
        eval_split=eval_split,
    )
    plan.timings["ray_start_s"] += ray_start_s
    _preflight(plan)
    _notify(callbacks, "on_start", plan)
    done = _read_back(plan, callbacks)
    if plan.start + len(done) < len(plan.tasks):
        t0 = time.perf_counter()
        channel = Queue(actor_options={"num_cpus": 0})
        remaining = SequencePlan(**{**plan.__dict__, "start": plan.start + len(done), "history": plan.history + done})
        fit = _Fit(_trainer(remaining, _worker_config(remaining, _eval_sets(plan), base_uri, channel, hooks)))
        done += _follow(remaining, fit, channel, callbacks)
        fit.join()
        plan.timings["fit_s"] = time.perf_counter() - t0
        if plan.start + len(done) < len(plan.tasks):
            failed = plan.start + len(done)
            _notify(callbacks, "on_failure", plan, failed, fit.error)
            raise _failure(plan, failed, fit.error) from fit.error  # the log file gets Ray's whole text
    result = plan.result(done)
    result.timings = plan.timings
    _notify(callbacks, "on_end", plan, result)
    return result


def _preflight(plan: SequencePlan) -> None:
    """Before anything is recorded or trained: every task has a global batch of training rows."""
    from pipelines.preflight import check_batches

    check_batches(plan.stream, {p.name: p.n_train for p in plan.prepared[plan.start :]})


def _eval_sets(plan: SequencePlan) -> dict[str, dict]:
    return {p.name: p.eval_set for p in plan.prepared}


def _failure(plan: SequencePlan, stage: int, error: BaseException | None) -> StageFailed:
    """One line of what Ray Train said (the whole error stays chained to the StageFailed, for the run's log)."""
    text = _ray_train_says(plan, error) if error is not None else "the worker group ended before the stage completed"
    earlier = f"stages 1-{stage} stay complete and promotable; " if stage else ""
    return StageFailed(f"stage {stage + 1}/{len(plan.tasks)} ({plan.tasks[stage]}) failed: {text}\n{earlier}")


# where Ray Train's controller messages turn from what happened to generic advice (its own knobs, not gorp's)
_RAY_ADVICE = ("Potential causes include", "Set the RAY_", "Please reduce")


def _ray_train_says(plan: SequencePlan, error: BaseException) -> str:
    """A controller error (the worker group did not start) as its message without Ray's generic advice, plus which
    keys to change; a worker group error as each distinct worker error's last line, with its ranks."""
    from ray.train import ControllerError, WorkerGroupError

    from pipelines.preflight import WAIT_FOR_WORKERS_ENV, wait_limit_s, worker_group_asks

    if isinstance(error, ControllerError):
        cause = error.controller_failure
        said = " ".join(str(cause).split())
        for marker in _RAY_ADVICE:
            said = said.split(marker)[0].strip()
        return (
            f"the worker group did not start. Ray Train: {said.rstrip('.')} ({type(cause).__name__}). It asked for "
            f"{worker_group_asks(plan.stream)}: lower them, or raise {WAIT_FOR_WORKERS_ENV} (now "
            f"{wait_limit_s():g} s) for a cluster that scales up"
        )
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        ranks: dict[str, list[str]] = {}
        for rank, failure in sorted(error.worker_failures.items()):
            ranks.setdefault(_last_line(failure), []).append(str(rank))
        return "; ".join(f"rank {','.join(r)}: {line}" for line, r in ranks.items())
    return _last_line(getattr(error, "__cause__", None) or error)


def _last_line(error: BaseException) -> str:
    """A traceback's last line (``Type: message``), else ``Type: `` and the message's first line; at most 400
    characters."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        line = lines[-1]
    else:
        line = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return line if len(line) <= 400 else line[:400] + " ..."
