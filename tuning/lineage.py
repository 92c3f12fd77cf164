"""The search in MLflow: one run for the search (its file, the held-out notes, the best trial, the outputs as
artifacts); each trial a run nested under it (``mlflow.parentRunId``), written by Ray's ``MLflowLoggerCallback``:
parameters, the per-stage metrics (step = stage), and here, at the end, ``gorp.stopped_at_stage``. No model versions:
a search registers nothing; ``gorp run best.yaml`` does.

The search's experiment is ``<the stream's experiment>-tune``, apart from the sequences that ``gorp lineage`` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray.air.integrations.mlflow import MLflowLoggerCallback

PARENT_FILE = "search_run.json"


@contextlib.contextmanager
def tracking_uri_kept():
    """Ray's MLflow callback calls ``mlflow.set_tracking_uri``, which also sets ``MLFLOW_TRACKING_URI`` in this
    process: a caller's next run in the same process (and its subprocesses) would record into the search's store.
    Both are put back as they were."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: MLflow's default again, and the variable unset


class TrialRuns(MLflowLoggerCallback):
    """Ray's ``MLflowLoggerCallback`` (a run per trial, nested under the search's), except that a trial that
    ``Tuner.restore`` starts again keeps the run it had: Ray keeps its trial -> run map in memory only, so a resumed
    search would otherwise give every restarted trial a second run."""

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            client = MlflowClient(self.tracking_uri)
            query = f"tags.trial_name = '{trial}' and tags.`mlflow.parentRunId` = '{self.tags['mlflow.parentRunId']}'"
            earlier = client.search_runs([self.mlflow_util.experiment_id], query, max_results=1)
            if earlier:
                self._trial_runs[trial] = earlier[0].info.run_id
                client.update_run(earlier[0].info.run_id, "RUNNING")
        super().log_trial_start(trial)


def trial_runs_callback(stream, parent_run_id: str, search_name: str) -> TrialRuns:
    return TrialRuns(
        tracking_uri(stream),
        experiment_name=experiment_name(stream),
        tags={"mlflow.parentRunId": parent_run_id, "gorp.search": search_name},
    )


def tracking_uri(stream) -> str:
    from pipelines.registry import tracking_uri_for

    return tracking_uri_for(stream.run_dir, stream.mlflow.tracking_uri)


def experiment_name(stream) -> str:
    return f"{stream.mlflow.experiment or stream.name}-tune"


def _client(stream):
    Path(stream.run_dir).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri(stream))


def open_search(stream, search, out: Path, *, resume: bool) -> str:
    """The search's run id: a new run, or on resume the one the search started with."""
    marker = out / PARENT_FILE
    client = _client(stream)
    if resume and marker.is_file():
        run_id = json.loads(marker.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp = client.get_experiment_by_name(experiment_name(stream))
    uri = tracking_uri(stream)  # artifacts beside a SQLite store, not in the working directory
    where = (
        (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
    )
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment_name(stream), artifact_location=where)
    run = client.create_run(exp_id, run_name=f"search-{search.name}", tags={"gorp.search": search.name})
    rid = run.info.run_id
    client.log_param(rid, "scheduler", search.scheduler.kind)
    client.log_param(rid, "num_samples", search.num_samples)
    client.log_param(rid, "seed", search.seed)
    client.log_param(rid, "space", json.dumps(search.model_dump(mode="json")["space"])[:6000])
    client.log_param(rid, "methods", ",".join(search.methods or [stream.method]))
    marker.write_text(json.dumps({"run_id": rid}))
    return rid


def close_search(stream, run_id: str, outcome) -> None:
    """Where each trial stopped (tag on its nested run), the best trial, the outputs as artifacts; the run ends."""
    client = _client(stream)
    exp = client.get_experiment_by_name(experiment_name(stream))
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=10000)
    for t in outcome.trials:  # Ray names a trial's run <trainable>_<trial id>
        for run in [r for r in nested if r.data.tags.get("trial_name", "").endswith(f"_{t['trial_id']}")]:
            client.set_tag(run.info.run_id, "gorp.stopped_at_stage", str(t["stages"]) if t["stopped"] else "-")
            client.set_tag(run.info.run_id, "gorp.stages_run", str(t["stages"]))
    if outcome.best is not None:
        client.log_metric(run_id, "best_objective", outcome.best["objective"])
        client.set_tag(run_id, "gorp.best_trial", outcome.best["trial_id"])
    client.log_metric(run_id, "stage_trainings", sum(t["stages"] for t in outcome.trials))
    for name in ("trials.csv", "best.yaml", "aa_per_stage.png"):
        if (outcome.out_dir / name).is_file():
            client.log_artifact(run_id, str(outcome.out_dir / name))
    client.set_terminated(run_id, "FINISHED")
