"""MLflow lineage of a continual stream: a parent run per sequence, a child run per stage, a model version per stage.

Called from the Ray driver process only (SQLite does not take concurrent writers). Every call names its run explicitly
through ``MlflowClient``; nothing here starts, ends or reads the fluent active run, so a caller's own
``mlflow.start_run()`` is left alone.

    lin = Lineage(tracking_uri_for(run_dir, stream.tracking_uri))
    parent = lin.start_sequence(stream.name, chash, resolved_config, resume=True)
    done = lin.completed_stages(parent)                    # stage -> StageRecord, skipped on --resume
    run = lin.start_stage(parent, t, task.name, {"steps": steps, "method": method})
    lin.log_step_metrics(run, [{"step": 1, "loss": 2.3, "lr": 1e-4, "tokens_per_s": 210.0}, ...])
    lin.log_stage_result(run, row, summary, run_dir / "heatmap.png", data=[("t/train", path, digest, "train")])
    version = lin.register_stage(run, "wordnet-gorp", out_dir, {"method": method, "data_digest": d, "config_hash": h})
    lin.finish_stage(run)                                  # or finish_stage(run, "FAILED", error=traceback)
    lin.finish_sequence(parent)

The registry side (versions, the promotion gate, ``gorp lineage``, loading a version) is in ``pipelines.registry``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

from pipelines.registry import (
    client_for,
    gate,
    gate_reason,
    lineage_command,
    lineage_report,
    load_version,
    local_path,
    metric_key,
    quiet_mlflow_logs,
    register_version,
    render_lineage,
)

__all__ = [
    "DataRef",
    "Lineage",
    "StageRecord",
    "gate",
    "gate_reason",
    "lineage_command",
    "lineage_report",
    "load_version",
    "quiet_mlflow_logs",
    "render_lineage",
    "tracking_uri_for",
]

MAX_PARAM_VALUE = 6000  # MLflow 3 limit
_BATCH = 500
_FINAL = ("FINISHED", "FAILED", "KILLED")


def tracking_uri_for(run_dir: str | Path, configured: str | None = None) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<absolute run_dir>/mlflow.db``."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class DataRef(NamedTuple):
    """A data source of a stage: shown under the run's inputs (``mlflow.log_input``) with its digest."""

    name: str
    source: str | Path
    digest: str
    context: str = "train"  # "train" / "test"


@dataclass
class StageRecord:
    """A completed stage, as ``completed_stages`` finds it in MLflow."""

    stage: int
    task: str
    run_id: str
    version: int
    source: str
    row: dict[str, float] = field(default_factory=dict)  # task -> accuracy after this stage
    summary: dict[str, float] = field(default_factory=dict)  # aa / bwt / fwt / forgetting
    zero_shot: dict[str, float] = field(default_factory=dict)  # task -> base-model accuracy (stage 0)

    @property
    def folder(self) -> Path | None:
        """The local model folder (None when the source is a remote URI: use ``load_version``)."""
        return local_path(self.source)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:MAX_PARAM_VALUE]
    return out


def _sqlite_dir(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else None


class Lineage:
    """Writes a sequence's runs and versions to one tracking store (see the module docstring for the call order)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str | None = None,
        *,
        aa_tolerance: float = 0.0,
        new_task_floor: float = 0.0,
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.aa_tolerance, self.new_task_floor = aa_tolerance, new_task_floor
        db_dir = _sqlite_dir(tracking_uri)
        if db_dir is not None:
            db_dir.mkdir(parents=True, exist_ok=True)
        self.client = client_for(tracking_uri)

    # -- sequence ------------------------------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        db_dir = _sqlite_dir(self.tracking_uri)  # keep artifacts beside the database, not in the working directory
        location = (db_dir / "mlartifacts").as_uri() if db_dir is not None else None
        return self.client.create_experiment(name, artifact_location=location)

    def start_sequence(self, stream_name: str, config_hash: str, params: dict[str, Any], resume: bool = False) -> str:
        """The parent run of a sequence (experiment: the configured name, else the stream's). ``params`` is the
        resolved stream config: logged as params and as ``stream.json``. With ``resume``, the newest parent run with
        this config hash is reopened instead of creating another one."""
        exp_id = self._experiment_id(self.experiment or stream_name)
        run_id = self.find_sequence(stream_name, config_hash) if resume else None
        if run_id is not None and self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        if run_id is None:
            tags = {"gorp.kind": "sequence", "gorp.stream": stream_name, "gorp.config_hash": config_hash}
            run_id = self.client.create_run(exp_id, tags=tags, run_name=f"{stream_name}-{config_hash}").info.run_id
            self.client.log_dict(run_id, params, "stream.json")
        self._log_params(run_id, params)
        return run_id

    def find_sequence(self, stream_name: str, config_hash: str) -> str | None:
        """The newest parent run of this stream with this config hash, or None."""
        exp = self.client.get_experiment_by_name(self.experiment or stream_name)
        if exp is None:
            return None
        found = self.client.search_runs(
            [exp.experiment_id],
            f"tags.`gorp.kind` = 'sequence' and tags.`gorp.config_hash` = '{config_hash}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def finish_sequence(self, parent_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_id, status)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params are write-once in MLflow: keys the run already has are kept (a resumed run keeps its values)."""
        have = self.client.get_run(run_id).data.params
        todo = [Param(k, v) for k, v in _flatten(params).items() if k not in have]
        for i in range(0, len(todo), 100):
            self.client.log_batch(run_id, params=todo[i : i + 100], synchronous=True)

    # -- stages --------------------------------------------------------------------------------------------------
    def _children(self, parent_id: str, stage: int | None = None) -> list:
        parent = self.client.get_run(parent_id)
        query = f"tags.mlflow.parentRunId = '{parent_id}'"
        if stage is not None:
            query += f" and tags.`gorp.stage` = '{stage}'"
        runs = self.client.search_runs([parent.info.experiment_id], query, order_by=["attributes.start_time DESC"])
        return list(runs)

    def completed_stages(self, parent_id: str) -> dict[int, StageRecord]:
        """Stages of this sequence with a FINISHED child run and a registered version (newest run per stage)."""
        out: dict[int, StageRecord] = {}
        for run in self._children(parent_id):
            stage = int(run.data.tags["gorp.stage"])
            if stage in out or run.info.status != "FINISHED":
                continue
            versions = [
                v
                for v in self.client.search_model_versions(f"run_id='{run.info.run_id}'")
                if v.tags.get("stage") == str(stage)
            ]
            if not versions:
                continue
            v = max(versions, key=lambda v: int(v.version))
            out[stage] = StageRecord(
                stage=stage,
                task=run.data.tags["gorp.task"],
                run_id=run.info.run_id,
                version=int(v.version),
                source=v.source,
                **_result_of(run.data),
            )
        return dict(sorted(out.items()))

    def start_stage(self, parent_id: str, stage: int, task: str, params: dict[str, Any] | None = None) -> str:
        """A child run for ``stage``; a non-finished one left by a killed driver is reused (tag ``gorp.attempt``)."""
        parent = self.client.get_run(parent_id)
        stale = [r for r in self._children(parent_id, stage) if r.info.status != "FINISHED"]
        if stale:
            run = stale[0]
            run_id = run.info.run_id
            attempt = int(run.data.tags.get("gorp.attempt", "1")) + 1
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "gorp.attempt", str(attempt))
        else:
            tags = {
                "mlflow.parentRunId": parent_id,
                "gorp.kind": "stage",
                "gorp.sequence": parent_id,
                "gorp.stage": str(stage),
                "gorp.task": task,
                "gorp.attempt": "1",
            }
            for key in ("gorp.stream", "gorp.config_hash"):
                if key in parent.data.tags:
                    tags[key] = parent.data.tags[key]
            run_id = self.client.create_run(
                parent.info.experiment_id, tags=tags, run_name=f"stage{stage:02d}-{task}"
            ).info.run_id
        self._log_params(run_id, {"stage": stage, "task": task, **(params or {})})
        return run_id

    def log_step_metrics(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """Training curves: each row has ``step`` and numbers (loss, lr, tokens_per_s, ...); optional ``time`` (s)."""
        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            ts = int(row["time"] * 1000) if row.get("time") is not None else now
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool):
                    metrics.append(Metric(k, float(v), ts, int(row["step"])))
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH], synchronous=True)

    def log_stage_result(
        self,
        run_id: str,
        row: dict[str, float | None],
        summary: dict[str, float | None],
        heatmap_png: str | Path | None = None,
        data: list[DataRef | tuple] = (),
        *,
        zero_shot: dict[str, float | None] | None = None,
    ) -> None:
        """The stage's matrix row (``acc/<task>``), ``aa``/``bwt``/``fwt``/``forgetting``, the heatmap and the data
        sources (run inputs with their digests). The summary and heatmap also go to the parent run, step = stage."""
        run = self.client.get_run(run_id)
        stage = int(run.data.tags["gorp.stage"])
        ts = int(time.time() * 1000)

        def metrics(prefix: str, values: dict[str, float | None], key=str) -> list[Metric]:
            return [Metric(prefix + key(k), float(v), ts, stage) for k, v in values.items() if v is not None]

        own = (
            metrics("acc/", row, metric_key) + metrics("", summary) + metrics("zero_shot/", zero_shot or {}, metric_key)
        )
        self.client.log_batch(run_id, metrics=own, synchronous=True)
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id:
            self.client.log_batch(parent_id, metrics=metrics("", summary), synchronous=True)
        if heatmap_png is not None and Path(heatmap_png).is_file():
            self.client.log_artifact(run_id, str(heatmap_png))
            if parent_id:
                self.client.log_artifact(parent_id, str(heatmap_png))
        if data:
            self.client.log_inputs(run_id, datasets=[_dataset_input(DataRef(*d)) for d in data])

    def register_stage(
        self,
        run_id: str,
        model_name: str,
        model_dir: str | Path,
        tags: dict[str, Any] | None = None,
        *,
        upload: bool = False,
        aa_tolerance: float | None = None,
        new_task_floor: float | None = None,
    ) -> int:
        """Register the stage's model folder as a new version of ``model_name``; returns the version number.

        The source is the absolute folder; with ``upload`` the folder is first logged as the run's ``model``
        artifacts and the version points there (portable with a remote artifact store). ``champion`` moves when
        :func:`gate` passes; ``@latest`` is MLflow's implicit newest version. Registering a stage twice returns the
        first version."""
        run = self.client.get_run(run_id)
        source = None
        if upload:
            if not any(v.tags.get("stage") == run.data.tags["gorp.stage"] for v in self._versions_of(run_id)):
                self.client.log_artifacts(run_id, str(model_dir), "model")
            source = f"{run.info.artifact_uri}/model"
        return register_version(
            self.client,
            run,
            model_name,
            model_dir,
            tags or {},
            aa_tolerance=self.aa_tolerance if aa_tolerance is None else aa_tolerance,
            new_task_floor=self.new_task_floor if new_task_floor is None else new_task_floor,
            source=source,
        )

    def _versions_of(self, run_id: str) -> list:
        return list(self.client.search_model_versions(f"run_id='{run_id}'"))

    def finish_stage(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        """End a stage run. A failed stage keeps its error (tag ``gorp.error`` and ``error.txt``) and registers
        nothing."""
        if status not in _FINAL:
            raise ValueError(f"status must be one of {_FINAL}, not {status!r}")
        if error:
            self.client.set_tag(run_id, "gorp.error", error[-4000:])
            self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, status)


def _dataset_input(ref: DataRef) -> DatasetInput:
    """A MetaDataset (source + digest, no data copied) as a run input with context ``train``/``test``."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # local paths match two registered source types (both "local")
        warnings.simplefilter("ignore")
        raw = str(ref.source) if "://" in str(ref.source) else str(Path(ref.source).resolve())
        source = resolve_dataset_source(raw)
    d = MetaDataset(source, name=ref.name[:500], digest=str(ref.digest)[:36]).to_dict()  # the store's column limits
    entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"])
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", ref.context)])


def _result_of(data) -> dict[str, dict[str, float]]:
    """row / summary / zero_shot from a stage run's metrics (the inverse of ``log_stage_result``)."""
    row = {k[4:]: v for k, v in data.metrics.items() if k.startswith("acc/")}
    zero = {k[10:]: v for k, v in data.metrics.items() if k.startswith("zero_shot/")}
    summary = {k: data.metrics[k] for k in ("aa", "bwt", "fwt", "forgetting") if k in data.metrics}
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    return {"row": row, "summary": clean, "zero_shot": zero}
