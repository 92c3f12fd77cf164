"""MLflow lineage of a continual stream: a parent run per sequence, a child run per stage, a model version per stage.

Called from the Ray driver process only (SQLite does not take concurrent writers). Every call names its run explicitly
through ``MlflowClient``; nothing here starts, ends or reads the fluent active run, so a caller's own
``mlflow.start_run()`` is left alone.

    lin = Lineage(tracking_uri_for(run_dir, stream.tracking_uri))
    parent = lin.find_sequence(stream.name, identity)      # the newest sequence with this configuration, or None
    done = lin.completed_stages(parent)                    # stage -> StageRecord (its version's source, its row)
    parent = lin.start_sequence(stream.name, identity, resolved_config, sequence_id, reopen=parent)
    run = lin.start_stage(parent, t, task.name, {"steps": steps, "method": method})
    lin.log_step_metrics(run, [{"step": 1, "loss": 2.3, "lr": 1e-4, "tokens_per_s": 210.0}, ...])
    lin.log_stage_result(run, row, summary, run_dir / "heatmap.png", data=[("t/train", path, digest, "train")])
    version = lin.register_stage(run, "wordnet-gorp", model_uri, {"method": method, "data_digest": d})
    lin.finish_stage(run)                                  # or finish_stage(run, "FAILED", error=traceback)
    lin.finish_sequence(parent)

The registry side (versions, the promotion gate, ``gorp lineage``, loading a version) is in ``pipelines.registry``.
:class:`LineageRecorder` is the callback of :func:`pipelines.sequence.run_sequence` that makes these calls as a
sequence runs.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

from pipelines.registry import (
    DEFAULT_MAX_FORGETTING,
    client_for,
    local_path,
    metric_key,
    register_version,
)
from pipelines.results import SequenceResult, StageResult
from pipelines.sequence import Callback, SequencePlan

MAX_PARAM_VALUE = 6000  # MLflow 3 limit
_BATCH = 500
_FINAL = ("FINISHED", "FAILED", "KILLED")


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
        max_forgetting: float = DEFAULT_MAX_FORGETTING,
        new_task_floor: float = 0.0,
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.max_forgetting, self.new_task_floor = max_forgetting, new_task_floor

    @functools.cached_property
    def client(self):
        """Opened on first use: constructing a Lineage creates no store (a run that fails on bad input leaves none)."""
        db_dir = _sqlite_dir(self.tracking_uri)
        if db_dir is not None:
            db_dir.mkdir(parents=True, exist_ok=True)
        return client_for(self.tracking_uri)

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

    def start_sequence(
        self, stream_name: str, config_hash: str, params: dict[str, Any], sequence_id: str, reopen: str | None = None
    ) -> str:
        """The parent run of a sequence (experiment: the configured name, else the stream's). ``params`` is the
        resolved stream config: logged as params and as ``stream.json``; ``sequence_id`` names the sequence's folder
        in the run's storage (tag ``gorp.sequence_id``). ``reopen``: an existing parent run to continue instead."""
        exp_id = self._experiment_id(self.experiment or stream_name)
        run_id = reopen
        if run_id is not None and self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        if run_id is None:
            tags = {
                "gorp.kind": "sequence",
                "gorp.stream": stream_name,
                "gorp.config_hash": config_hash,
                "gorp.sequence_id": sequence_id,
            }
            run_id = self.client.create_run(exp_id, tags=tags, run_name=f"{stream_name}-{sequence_id}").info.run_id
            self.client.log_dict(run_id, params, "stream.json")
        self._log_params(run_id, params)
        return run_id

    def find_sequence(self, stream_name: str, config_hash: str) -> str | None:
        """The newest parent run of this stream with this config hash, or None."""
        found = self.sequence_runs(stream_name, config_hash, limit=1)
        return found[0].info.run_id if found else None

    def sequence_runs(self, stream_name: str, config_hash: str, limit: int = 100) -> list:
        """The parent runs of this stream with this config hash, newest first."""
        exp = self.client.get_experiment_by_name(self.experiment or stream_name)
        if exp is None:
            return []
        return self.client.search_runs(
            [exp.experiment_id],
            f"tags.`gorp.kind` = 'sequence' and tags.`gorp.config_hash` = '{config_hash}'",
            order_by=["attributes.start_time DESC"],
            max_results=limit,
        )

    def sequence_info(self, parent_id: str) -> tuple[str, str]:
        """(the sequence's id in the run's storage, the parent run's status)."""
        run = self.client.get_run(parent_id)
        return run.data.tags.get("gorp.sequence_id", parent_id[:8]), run.info.status

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
        answers: dict[str, dict[str, int]] | None = None,
        method_stats: dict[str, float] | None = None,
    ) -> None:
        """The stage's matrix row (``acc/<task>``), ``aa``/``bwt``/``fwt``/``forgetting``, what the method measured
        (``method/<name>``, e.g. the share of the gradient gorp's memory removed), the heatmap, the data sources (run
        inputs with their digests) and each task's most frequent answers (``answers.json``). The summary and heatmap
        also go to the parent run, step = stage."""
        run = self.client.get_run(run_id)
        stage = int(run.data.tags["gorp.stage"])
        ts = int(time.time() * 1000)

        def metrics(prefix: str, values: dict[str, float | None], key=str) -> list[Metric]:
            return [Metric(prefix + key(k), float(v), ts, stage) for k, v in values.items() if v is not None]

        own = (
            metrics("acc/", row, metric_key)
            + metrics("", summary)
            + metrics("zero_shot/", zero_shot or {}, metric_key)
            + metrics("method/", method_stats or {})
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
        if answers:
            self.client.log_dict(run_id, answers, "answers.json")

    def register_stage(
        self, run_id: str, model_name: str, source: str | Path, tags: dict[str, Any] | None = None
    ) -> int:
        """Register the stage's model (a local folder or a URI in the run's storage) as a new version of
        ``model_name``; returns the version number. ``champion`` moves when the promotion gate passes
        (:func:`pipelines.registry.gate_reason`); ``@latest`` is MLflow's implicit newest version. Registering a stage
        twice returns the first version."""
        source = str(source)
        if local_path(source) is not None:
            folder = Path(local_path(source)).resolve()
            if not folder.is_dir():
                raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
            source = str(folder)
        return register_version(
            self.client,
            self.client.get_run(run_id),
            model_name,
            source,
            tags or {},
            max_forgetting=self.max_forgetting,
            new_task_floor=self.new_task_floor,
        )

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


class LineageRecorder(Callback):
    """Records a sequence in MLflow as it runs: the parent run on start, a child run per stage, its loss curve, row,
    metrics and data sources, and a registered model version whose source is the stage's model in the run's storage.

    Wire it in after :class:`pipelines.recorders.ResultsWriter` (it logs the heatmap that one draws)."""

    def __init__(self, lineage: Lineage, identity: str, *, run_dir: str | Path, reopen: str | None = None, say=None):
        self.lin, self.identity, self.run_dir, self.parent = lineage, identity, Path(run_dir), reopen
        self.say = say or (lambda text: None)
        self.run_ids: dict[int, str] = {}
        self.stages: list[StageResult] = []

    def on_start(self, plan: SequencePlan) -> None:
        resolved = {**plan.stream.model_dump(mode="json"), "method": plan.method, "method_args": plan.method_args}
        name = plan.stream.name
        self.parent = self.lin.start_sequence(name, self.identity, resolved, plan.sequence_id, reopen=self.parent)
        self.stages = list(plan.history)

    def on_stage_start(self, plan: SequencePlan, stage: int) -> None:
        sc = plan.stream.scaling
        params = {"method": plan.method, "steps": plan.steps[stage], "num_workers": sc.num_workers, "fsdp": sc.fsdp}
        self.run_ids[stage] = self.lin.start_stage(self.parent, stage, plan.tasks[stage], params)

    def on_stage_end(self, plan: SequencePlan, result: StageResult) -> None:
        t, run_id, names = result.stage, self.run_ids[result.stage], plan.tasks
        self.stages.append(result)
        seq = SequenceResult(plan.stream.name, plan.sequence_id, names, self.stages)
        first = result.resumed_from + 1
        self.lin.log_step_metrics(run_id, [{"step": first + i, "loss": v} for i, v in enumerate(result.losses)])
        task = plan.stream.tasks[t]
        digests = plan.prepared[t].digests
        data = [DataRef(f"{names[t]}/{s}", str(p), digests[s], s) for s, p in task.sources().items()]
        zero_shot = dict(zip(names, seq.zero_shot, strict=True)) if t == 0 else None
        row = dict(zip(names, seq.matrix[-1], strict=True))
        self.lin.log_stage_result(
            run_id,
            row,
            seq.summary,
            self.run_dir / "heatmap.png",
            data,
            zero_shot=zero_shot,
            answers=result.answers,
            method_stats=result.method_stats,
        )
        tags = {"method": plan.method, "data_digest": digests["train"], "config_hash": self.identity}
        version = self.lin.register_stage(run_id, plan.stream.name, result.model_uri, tags)
        self.lin.finish_stage(run_id)
        self.say(f"stage {t + 1}/{len(names)} {names[t]}: registered {plan.stream.name} version {version}")

    def on_end(self, plan: SequencePlan, result: SequenceResult) -> None:
        self.lin.finish_sequence(self.parent)

    def on_failure(self, plan: SequencePlan, stage: int, error: BaseException | None) -> None:
        import traceback

        text = "".join(traceback.format_exception(error)) if error else "the worker group ended before the stage ended"
        if stage in self.run_ids:
            self.lin.finish_stage(self.run_ids[stage], "FAILED", error=text)
        self.lin.finish_sequence(self.parent, "FAILED")
