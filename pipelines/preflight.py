"""What can be known to fail before anything starts, checked before it is waited for, each with a message that names
the key, file or address to change.

    check_tracking(tracking_uri)             # an MLflow server answers within a few seconds (before Ray starts)
    check_batches(stream, {"first": 32})     # a task with fewer training rows than one global batch
    check_remote_code(model_folder, True)    # trust_remote_code: every module config.json's auto_map names is there
    check_resources(stream)                  # the Ray cluster can place the worker group (after Ray starts)

Each raises :class:`PreflightError` (a ValueError), whose text is one or two lines.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

TRACKING_TIMEOUT_S = 5.0
WAIT_FOR_WORKERS_ENV = "GORP_WAIT_FOR_WORKERS_S"  # how long an autoscaling cluster may take to grow (default 600)


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


def check_resources(stream, say=print, wait_s: float | None = None) -> None:
    """The worker group (``scaling.num_workers`` x ``scaling.cpus_per_worker`` CPUs, and a GPU each with
    ``use_gpu``) must fit the Ray cluster. A local Ray cannot grow: an error at once. An attached cluster
    (``RAY_ADDRESS``) may autoscale: it is waited for, visibly, up to ``$GORP_WAIT_FOR_WORKERS_S`` (600 s)."""
    import ray

    sc = stream.scaling
    per_worker = {"CPU": float(sc.cpus_per_worker)} | ({"GPU": 1.0} if sc.use_gpu else {})
    asked = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    can_grow = bool(os.environ.get("RAY_ADDRESS"))
    limit = float(os.environ.get(WAIT_FOR_WORKERS_ENV, 600)) if wait_s is None else wait_s
    t0 = time.monotonic()
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        placeable = _placeable(nodes, per_worker)
        if placeable >= sc.num_workers:
            return
        have = ", ".join(f"{v:g} {k}" for k, v in sorted(ray.cluster_resources().items()) if k in per_worker)
        what = (
            f"scaling.num_workers {sc.num_workers} workers x ({asked}) each (scaling.cpus_per_worker, "
            f"scaling.use_gpu); the Ray cluster has {have or 'none'} on {len(nodes)} node(s): {placeable} worker(s) fit"
        )
        waited = time.monotonic() - t0
        if not can_grow or waited >= limit:
            why = "a local Ray cannot grow" if not can_grow else f"waited {waited:.0f} s ({WAIT_FOR_WORKERS_ENV})"
            raise PreflightError(f"{what}; {why}: lower scaling.num_workers or scaling.cpus_per_worker")
        say(f"waiting for {sc.num_workers} workers ({waited:.0f} s of {limit:.0f} s): {what}")
        time.sleep(min(10.0, max(limit - waited, 0.1)))
