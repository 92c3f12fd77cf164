"""``gorp tune STREAM SEARCH.yaml``: a Ray Tune search whose trials are whole continual sequences.

    search = tune_stream("stream.yaml", "search.yaml")     # -> TuneOutcome: trials, best, files written
    tune_stream("stream.yaml", "search.yaml", resume=True)  # after the driver died: Tuner.restore

What it does, in order: validates both files (and that every method takes the space's keys); builds the search's
stream (validation splits, or held-out slices of training: :mod:`tuning.holdout`); tokenizes every task once into the
search's cache (trials then hit it); opens one MLflow run for the search; runs the trials with Ray Tune (ASHA on the
stage index by default), each trial's runs nested under the search's (Ray's ``MLflowLoggerCallback`` with the parent
tag; no model versions); then writes the table, ``best.yaml``, ``trials.csv`` and ``aa_per_stage.png``.

Resources: a trial's own driver (the Tune function) holds a sliver of a CPU (``DRIVER_CPU``) and its TorchTrainer's
workers take what the stream's ``scaling`` asks for; at most as many trials run at once as the cluster can hold worker
groups (and the search's ``concurrency``). A trial that held a whole CPU for its driver could take the CPU its own
workers wait for (Ray issue #54305).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.spec import SpecError, load_stream
from tuning.halving import start_slots
from tuning.search import check_space, load_search
from tuning.trial import run_trial

DRIVER_CPU = 0.01  # what a trial's driver holds: it waits on its workers and Tune, it computes nothing
DRIVER_MEMORY = 256 * 2**20  # what it asks for where it gets no CPU (bytes; Tune refuses an empty request)
EXPERIMENT = "search"  # the Tune experiment's folder under the search's output folder


@dataclass
class TuneOutcome:
    out_dir: Path
    trials: list[dict]  # one per trial: id, config, aa per stage, objective, stages, stopped, status
    best: dict | None
    notes: list[str] = field(default_factory=list)
    parent_run_id: str | None = None


def driver_cpu(stream, cluster: dict[str, float]) -> float:
    """DRIVER_CPU, or 0 where the worker group alone takes every CPU (a sliver more would never be placed)."""
    workers = stream.scaling.num_workers * stream.scaling.cpus_per_worker
    return DRIVER_CPU if cluster.get("CPU", 1) >= workers + DRIVER_CPU else 0.0


def driver_resources(stream, cluster: dict[str, float]) -> dict[str, float]:
    """What a trial's driver asks Tune for: ``driver_cpu``, or with none, a little memory (Tune needs a resource)."""
    cpu = driver_cpu(stream, cluster)
    return {"CPU": cpu} if cpu else {"CPU": 0.0, "memory": DRIVER_MEMORY}


def concurrent_trials(stream, cluster: dict[str, float], cap: int | None) -> int:
    """How many trials' worker groups fit at once (each trial's driver takes only ``driver_cpu``)."""
    sc = stream.scaling
    fits = cluster.get("CPU", 1) // (sc.num_workers * sc.cpus_per_worker + driver_cpu(stream, cluster))
    if sc.use_gpu:
        fits = min(fits, cluster.get("GPU", 0) // sc.num_workers)
    return max(1, min(int(fits), cap or math.inf))


def start_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> None:
    """A local Ray for a search (unless Ray is up or RAY_ADDRESS names a cluster), its dashboard on loopback at a
    free port that every worker knows (``RAY_API_SERVER_ADDRESS``). Ray Train's placement-group cleaner, which frees
    the worker group of a trial that Tune stopped (Ray issue #54305), finds its cluster through the state API; with
    several Ray instances on one machine it otherwise cannot tell which is its own, and a stopped trial's CPUs stay
    taken: the next trial waits for them forever."""
    import socket

    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = (env_vars or {}) | {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as pipelines.sequence.init_ray
    ray.init(
        address="local",
        num_cpus=num_cpus,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )


def tune_stream(stream_path, search_path, *, out_dir=None, resume: bool = False, echo=print) -> TuneOutcome:
    import ray

    from pipelines.data import prepare_stream
    from pipelines.demo_model import resolve_model
    from pipelines.sequence import init_ray
    from tuning import lineage
    from tuning.holdout import validation_stream
    from tuning.report import write_outputs

    stream, search = load_stream(stream_path), load_search(search_path)
    check_space(search, stream)
    out = Path(out_dir or Path(stream.run_dir) / "tune" / search.name).resolve()
    exp_dir = out / EXPERIMENT
    if resume and not exp_dir.is_dir():
        raise SpecError(f"--resume: no search to resume in {out}")
    if not resume and exp_dir.exists():
        raise SpecError(f"{out} already holds a search: pass --resume to continue it, or --out elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    # Tune saves the search's state every 10 s or more by default; a driver killed in between reruns the trials that
    # finished meanwhile. Stage-long trials make a save a second cheap (a user's value wins).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Keeping one checkpoint a trial makes Tune save the search's state after every stage report, which is what a
    # resume needs; Tune warns about it whenever two stages end within 5 s of each other.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray()
    init_ray()
    val_stream, notes = validation_stream(stream, out, search.holdout_fraction, search.seed)
    for note in notes:
        echo(note)
    # every task tokenized once, here; the trials find it in the shared cache
    prepare_stream(val_stream, resolve_model(stream.model), out, cache_dir=out / "cache", eval_split="validation")
    parent = lineage.open_search(stream, search, out, resume=resume)
    slots, slots_actor = _slots(stream, search)
    tuner = _tuner(stream, val_stream, search, out, parent, resume, slots)
    try:
        with lineage.tracking_uri_kept():
            results = tuner.fit()
    finally:
        if slots_actor is not None:
            ray.kill(slots_actor)
    outcome = TuneOutcome(out, _trials(results, len(stream.tasks)), None, notes, parent)
    outcome.best = max(
        (t for t in outcome.trials if t["stages"] == len(stream.tasks)), key=lambda t: t["objective"], default=None
    )
    write_outputs(outcome, stream, search, echo=echo)
    lineage.close_search(stream, parent, outcome)
    return outcome


def _slots(stream, search):
    """A halving search's trials all exist from the start: its slots (name, actor) keep to the concurrency
    (:mod:`tuning.halving`). Other searches: (None, None), Tune's own limit holds."""
    import ray

    if search.scheduler.kind != "halving":
        return None, None
    name = f"gorp-tune-slots-{uuid.uuid4().hex[:8]}"
    return name, start_slots(name, concurrent_trials(stream, ray.cluster_resources(), search.concurrency))


def _tuner(stream, val_stream, search, out: Path, parent_run_id: str, resume: bool, slots: str | None):
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tuning.lineage import trial_runs_callback

    n_stages = len(stream.tasks)
    running = concurrent_trials(stream, ray.cluster_resources(), search.concurrency)
    halving = slots is not None  # a halving search: its slots limit, not the generator (see _slots)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            stream_data=val_stream.model_dump(mode="json"),
            search_dir=str(out),
            objective=search.objective,
            rungs=search.scheduler.rungs(n_stages),
            slots=slots,
        ),
        driver_resources(stream, ray.cluster_resources()),
    )
    if resume:
        return tune.Tuner.restore(str(out / EXPERIMENT), trainable, resume_unfinished=True, resume_errored=True)
    mlflow_cb = trial_runs_callback(stream, parent_run_id, search.name)
    return tune.Tuner(
        trainable,
        param_space=search.param_space(stream.method),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            scheduler=_scheduler(search, n_stages),
            # The generator takes the limit itself (TuneConfig's max_concurrent_trials is ignored with a generator).
            # Halving needs every trial in its bracket (a paused trial counts as live here): its slots limit.
            search_alg=BasicVariantGenerator(random_state=search.seed, max_concurrent=0 if halving else running),
            num_samples=search.samples(),
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out),
            callbacks=[mlflow_cb],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # a trial's history so far (tuning.trial)
            verbose=0,
        ),
    )


def _scheduler(search, n_stages: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tuning.halving import StageHalving

    sc = search.scheduler
    if sc.kind == "asha":
        return ASHAScheduler(
            time_attr="stage", max_t=n_stages, grace_period=sc.grace_period, reduction_factor=sc.reduction_factor
        )
    if sc.kind == "halving":
        return StageHalving(
            trials=search.trials(),
            stages=n_stages,
            grace_period=sc.grace_period,
            reduction_factor=sc.reduction_factor,
        )
    return FIFOScheduler()


def _trials(results, n_stages: int) -> list[dict]:
    trials = []
    for r in results:
        df = r.metrics_dataframe
        rows = [] if df is None or "stage" not in df else df.dropna(subset=["stage"]).to_dict("records")
        per_stage = {int(row["stage"]): row for row in rows}  # a resumed trial may report a stage twice: the last
        stages = max(per_stage, default=0)
        trials.append(
            {
                "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
                "config": {k: v.item() if hasattr(v, "item") else v for k, v in r.config.items()},
                "aa": [per_stage[s].get("aa") for s in sorted(per_stage)],
                "objective": per_stage[stages]["objective"] if stages else None,
                "stages": stages,
                "stopped": bool(stages and stages < n_stages and r.error is None),
                "ended": per_stage[stages].get("timestamp") if stages else None,
                "status": "ERROR" if r.error is not None else "TERMINATED",
                "error": None if r.error is None else str(r.error)[-300:],
            }
        )
    trials.sort(key=lambda t: t["trial_id"])
    return trials


def outcome_json(outcome: TuneOutcome) -> str:
    return json.dumps({"best": outcome.best, "trials": outcome.trials, "notes": outcome.notes}, indent=1, default=str)
