"""What can be known to fail before anything starts, checked before it is waited for, each with a message that names
the key, file or address to change.

    check_tracking(tracking_uri)             # an MLflow server answers within a few seconds (before Ray starts)
    check_batches(stream, {"first": 32})     # a task with fewer training rows than one global batch
    check_remote_code(model_folder, True)    # trust_remote_code: every module config.json's auto_map names is there
    check_resources(stream)                  # the Ray cluster can place the worker group (after Ray starts)
    start_budget()                           # how long Ray Train may take to start the worker group, then its error

Each raises :class:`PreflightError` (a ValueError), whose text is one or two lines.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

TRACKING_TIMEOUT_S = 5.0
WAIT_FOR_WORKERS_ENV = "GORP_WAIT_FOR_WORKERS_S"  # how long an autoscaling cluster may take to grow (default 600)
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait for one worker-group start (60 s)


class PreflightError(ValueError):
    """Something that would fail later, found now; the text says what to change."""


def check_tracking(uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking server must answer (any HTTP status counts) within ``timeout_s``; MLflow's own
    client retries for minutes before it gives up. Other stores (``sqlite:///``, files) are not contacted."""
    if not uri.startswith(("http://", "https://")):
        return
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except OSError as e:  # URLError, a timeout, a refused connection
        reason = getattr(e, "reason", e)
        raise PreflightError(
            f"the MLflow tracking server {uri} is unreachable ({reason}, after {time.perf_counter() - t:.1f} s): "
            "start it, or change mlflow.tracking_uri in the stream (or MLFLOW_TRACKING_URI)"
        ) from None


def check_batches(stream, train_rows: dict[str, int]) -> None:
    """Every task needs at least one global batch (``training.batch_size``) of training rows, and the global batch
    must split evenly over ``scaling.num_workers``."""
    bs, workers = stream.training.batch_size, stream.scaling.num_workers
    if bs % workers:
        raise PreflightError(
            f"training.batch_size {bs} is not divisible by scaling.num_workers {workers}: change one of them"
        )
    for task in stream.tasks:
        n = train_rows.get(task.name)
        if n is not None and n < bs:
            raise PreflightError(
                f"task {task.name!r}: {n} training rows ({task.train}) are fewer than one global batch "
                f"(training.batch_size {bs}): lower training.batch_size to at most {n}, or add data"
            )


def check_remote_code(folder: str | Path, trust_remote_code: bool) -> None:
    """With ``trust_remote_code``, the modules ``config.json``'s ``auto_map`` names must be files in the model folder
    (nothing is fetched from a hub)."""
    config = Path(folder) / "config.json"
    if not trust_remote_code or not config.is_file():
        return
    auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map") or {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if r]
    for ref in refs:
        if "--" in ref:
            raise PreflightError(
                f"{config}: auto_map {ref!r} points to another hub repository; copy its module into {folder} "
                "and name it without the 'repo--' prefix"
            )
        module = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"
        if not (Path(folder) / module).is_file():
            raise PreflightError(
                f"{config}: auto_map names {ref!r} but {Path(folder) / module} is missing "
                "(trust_remote_code: the model folder must hold its code)"
            )


def _placeable(nodes: list[dict], per_worker: dict[str, float]) -> int:
    """How many workers the nodes can place (each worker on one node)."""
    total = 0
    for node in nodes:
        res = node.get("Resources", {})
        fits = [int(res.get(k, 0.0) // v) for k, v in per_worker.items() if v > 0]
        total += min(fits) if fits else 0
    return total


def wait_limit_s() -> float:
    """How long the worker group may take to start (``$GORP_WAIT_FOR_WORKERS_S``, default 600 s)."""
    return float(os.environ.get(WAIT_FOR_WORKERS_ENV, 600))


_START_TIMEOUT_SET: list[str] = []  # the value start_budget put in the environment (a user's own value wins)


def start_budget() -> tuple[float, int]:
    """Ray Train's worker-group start timeout per attempt and its ``FailureConfig.controller_failure_limit``, such
    that a worker group that cannot start ends the fit with Ray Train's own error once ``wait_limit_s()`` has passed.
    Ray's default retries a start that timed out or failed forever, in its controller's log only (a driver started
    with ``log_to_driver=False`` shows nothing). A user's ``$RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` is kept; ours is
    put in the environment, which ``fit()`` passes on to the controller."""
    wait, theirs = wait_limit_s(), os.environ.get(START_TIMEOUT_ENV)
    if theirs and theirs not in _START_TIMEOUT_SET:
        per_try = float(theirs)
    else:
        per_try = min(60.0, wait)
        os.environ[START_TIMEOUT_ENV] = f"{per_try:g}"
        _START_TIMEOUT_SET.append(os.environ[START_TIMEOUT_ENV])
    return per_try, max(0, math.ceil(wait / max(per_try, 1e-3)) - 1)


def _asked(sc) -> tuple[dict[str, float], str]:
    per_worker = {"CPU": float(sc.cpus_per_worker)} | ({"GPU": 1.0} if sc.use_gpu else {})
    return per_worker, ", ".join(f"{v:g} {k}" for k, v in per_worker.items())


def worker_group_asks(stream) -> str:
    """What the stream asks of the cluster, naming the keys."""
    sc = stream.scaling
    return (
        f"scaling.num_workers {sc.num_workers} workers x ({_asked(sc)[1]}) each (scaling.cpus_per_worker, "
        "scaling.use_gpu)"
    )


def check_resources(stream, say=print) -> None:
    """The worker group (``scaling.num_workers`` x ``scaling.cpus_per_worker`` CPUs, and a GPU each with
    ``use_gpu``) must fit the Ray cluster. A local Ray cannot grow: an error at once. An attached cluster
    (``RAY_ADDRESS``) may autoscale, but only on demand: the nodes come for the worker group's placement group, which
    Ray Train requests, not for a driver that watches ``ray.nodes()``. So this says that it waits, and Ray Train
    waits, up to ``$GORP_WAIT_FOR_WORKERS_S`` (:func:`start_budget`); then its error ends the run."""
    import ray

    sc = stream.scaling
    per_worker, _ = _asked(sc)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    placeable = _placeable(nodes, per_worker)
    if placeable >= sc.num_workers:
        return
    have = ", ".join(f"{v:g} {k}" for k, v in sorted(ray.cluster_resources().items()) if k in per_worker)
    what = (
        f"{worker_group_asks(stream)}; the Ray cluster has {have or 'none'} on {len(nodes)} node(s): "
        f"{placeable} worker(s) fit"
    )
    if not os.environ.get("RAY_ADDRESS"):
        raise PreflightError(f"{what}; a local Ray cannot grow: lower scaling.num_workers or scaling.cpus_per_worker")
    say(
        f"waiting up to {wait_limit_s():.0f} s ({WAIT_FOR_WORKERS_ENV}) for {sc.num_workers} workers, which Ray "
        f"Train asks the cluster's autoscaler for: {what}"
    )
