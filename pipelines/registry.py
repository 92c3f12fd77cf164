"""The MLflow model registry side of lineage: one model version per stage, the promotion gate, reports, loading.

Every stage's model folder becomes a version of a registered model, made with ``MlflowClient.create_model_version``
(MLflow 3.17's ``mlflow.register_model`` refuses a plain folder; models are never pickled). Version tags: ``stage``,
``task``, ``parent_version``, ``method``, ``data_digest``, ``config_hash``, ``aa``, ``bwt``, ``sequence`` (the parent
run) and ``promoted`` (the gate's verdict). Aliases:

- ``latest`` is reserved by MLflow 3.17 (setting it raises "'latest' alias name (case insensitive) is reserved");
  ``models:/NAME@latest`` resolves to the highest version, which is always the newest stage registered, so it moves
  by itself, and a failed stage (no version) leaves it where it was.
- ``champion`` moves only when :func:`gate` passes.

Reads go through ``MlflowClient`` with an explicit tracking URI, never through the fluent active-run API.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines import integrity

CHAMPION = "champion"
DEFAULT_MAX_FORGETTING = 0.05  # mean accuracy a new champion may lose on the tasks the old one knows
LATEST = "latest"  # implicit in MLflow 3.17: the highest version
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w.-]+))$", re.IGNORECASE)


def gate_reason(
    candidate: Mapping[str, float | None],
    new_task: str,
    champion: Mapping[str, float | None] | None,
    max_forgetting: float = DEFAULT_MAX_FORGETTING,
    new_task_floor: float = 0.0,
) -> str:
    """The promotion gate, like with like: ``"pass"`` or why not.

    ``candidate``: task -> the candidate's accuracy; ``champion``: task -> the champion's accuracy on the tasks it
    learned (None: no champion yet). The candidate must reach ``new_task_floor`` on its new task and, on the tasks the
    champion knows, lose at most ``max_forgetting`` of accuracy on average (never AA over different task sets)."""
    new = _num(candidate.get(new_task))
    if new is None:
        return f"fail: the new task {new_task!r} has no accuracy"
    if new < new_task_floor:
        return f"fail: new task {new_task} accuracy {new:.4f} < floor {new_task_floor:.4f}"
    if not champion:
        return "pass"
    missing = [t for t in champion if _num(candidate.get(t)) is None]
    if missing:
        return f"fail: not evaluated on the champion's task(s) {missing}"
    drop = sum(_num(champion[t]) - _num(candidate[t]) for t in champion if _num(champion[t]) is not None)
    drop /= len(champion)
    if drop > max_forgetting + 1e-12:
        return f"fail: loses {drop:.4f} on the champion's {len(champion)} task(s) > max_forgetting {max_forgetting:.4f}"
    return "pass"


def gate(*args, **kwargs) -> bool:
    """True when :func:`gate_reason` passes."""
    return gate_reason(*args, **kwargs) == "pass"


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _num(value: Any) -> float | None:
    """A float from a tag value ('' / 'None' / 'nan' -> None)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _tag(value: Any) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def by_alias(client: MlflowClient, name: str, alias: str):
    """The version an alias points at, or None when the alias is not set (or the model has no version)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    if not name or any(c in name for c in "'\"/@"):
        raise ValueError(
            f"model name {name!r} must be non-empty, without quotes, '/' or '@' (it goes into models:/ URIs)"
        )
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, tags={"gorp": "continual"})


def version_of_stage(client: MlflowClient, name: str, stage: int, sequence: str):
    """The version registered for ``stage`` by the sequence (parent run) ``sequence``, or None."""
    found = client.search_model_versions(f"name='{name}' and tags.stage='{stage}' and tags.sequence='{sequence}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def register_version(
    client: MlflowClient,
    run,
    name: str,
    source: str,
    tags: dict[str, Any],
    *,
    max_forgetting: float = DEFAULT_MAX_FORGETTING,
    new_task_floor: float = 0.0,
) -> int:
    """Register the stage model at ``source`` (a local folder or a URI; ``run`` has logged its results) as a version
    of ``name``; returns its number. ``champion`` moves when :func:`gate_reason` passes.

    Idempotent: a version this run already made for this stage is returned (and the champion alias repaired if the
    gate had passed) instead of creating a duplicate.
    """
    stage, task, sequence = int(run.data.tags["gorp.stage"]), run.data.tags["gorp.task"], run.data.tags["gorp.sequence"]
    metrics = run.data.metrics
    if "aa" not in metrics:
        raise ValueError(f"stage run {run.info.run_id} has no 'aa' metric; call log_stage_result before register_stage")
    ensure_registered_model(client, name)
    champion = by_alias(client, name, CHAMPION)
    for v in client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'"):
        if v.tags.get("stage") == str(stage):
            if v.tags.get("promoted") == "true" and (champion is None or int(champion.version) < int(v.version)):
                client.set_registered_model_alias(name, CHAMPION, str(v.version))
            return int(v.version)

    parent = tags.get("parent_version")
    if parent is None and stage > 0:
        prev = version_of_stage(client, name, stage - 1, sequence)
        parent = prev.version if prev is not None else None
    verdict = gate_reason(_row(metrics), task, _champion_row(client, champion), max_forgetting, new_task_floor)
    all_tags = {
        **{k: _tag(v) for k, v in tags.items()},
        "stage": str(stage),
        "task": task,
        "parent_version": _tag(parent),
        "sequence": sequence,
        "aa": _tag(metrics.get("aa")),
        "bwt": _tag(metrics.get("bwt")),
        "promoted": "true" if verdict == "pass" else "false",
        "gate": verdict,
    }
    for key in ("method", "data_digest", "config_hash"):
        all_tags.setdefault(key, run.data.tags.get(f"gorp.{key}", ""))
    all_tags.setdefault(integrity.TAG, json.dumps(integrity.weight_digests(source), sort_keys=True))
    all_tags.setdefault("tasks", ",".join(learned_tasks(client, run)))
    mv = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=all_tags)
    if verdict == "pass":
        client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    return int(mv.version)


def learned_tasks(client: MlflowClient, run) -> list[str]:
    """The tasks a stage's model has learned: those of its sequence's stages up to and including its own."""
    stage, sequence = int(run.data.tags["gorp.stage"]), run.data.tags["gorp.sequence"]
    found = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{sequence}'")
    by_stage = {int(r.data.tags["gorp.stage"]): r.data.tags["gorp.task"] for r in found if "gorp.stage" in r.data.tags}
    return [by_stage[t] for t in sorted(by_stage) if t <= stage]


def _row(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """task -> accuracy from a stage run's ``acc/<task>`` metrics."""
    return {k[len("acc/") :]: _num(v) for k, v in metrics.items() if k.startswith("acc/")}


def _champion_row(client: MlflowClient, champion) -> dict[str, float | None] | None:
    """The champion's accuracy on each task it learned (its version's ``tasks`` tag), from its stage run."""
    if champion is None:
        return None
    learned = [t for t in champion.tags.get("tasks", champion.tags.get("task", "")).split(",") if t]
    row = _row(client.get_run(champion.run_id).data.metrics) if champion.run_id else {}
    return {t: row.get(metric_key(t)) for t in learned}


def metric_key(task: str) -> str:
    """A task name as an MLflow metric-name component (letters, digits, ``_-. /`` are kept)."""
    return re.sub(r"[^\w\-. ]", "_", task)


def _missing_model(name: str, tracking_uri: str) -> LookupError:
    return LookupError(f"no registered model {name!r} at {tracking_uri}; run `gorp run` first (or pass --tracking-uri)")


def lineage_report(model_name: str, tracking_uri: str) -> dict[str, Any]:
    """The chain of versions of ``model_name`` (ordered by stage, then version) and the accuracy matrix rebuilt from the
    stage runs' ``acc/<task>`` metrics. Reads MLflow only."""
    client = client_for(tracking_uri)
    try:
        registered = client.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise _missing_model(model_name, tracking_uri) from None
        raise
    found = client.search_model_versions(f"name='{model_name}'")
    found.sort(key=lambda v: (int(v.tags.get("stage", -1)), int(v.version)))
    aliases: dict[str, int] = {}
    for alias in sorted({*registered.aliases, LATEST}):  # search_model_versions returns no aliases in 3.17
        mv = by_alias(client, model_name, alias)
        if mv is not None:
            aliases[alias] = int(mv.version)
    versions, metrics_of = [], {}
    for v in found:
        metrics = _run_metrics(client, v.run_id)
        metrics_of[int(v.version)] = metrics
        t = v.tags
        versions.append(
            {
                "version": int(v.version),
                "stage": int(t["stage"]) if t.get("stage", "").isdigit() else None,
                "task": t.get("task"),
                "parent_version": int(t["parent_version"]) if t.get("parent_version", "").isdigit() else None,
                "method": t.get("method"),
                "data_digest": t.get("data_digest"),
                "config_hash": t.get("config_hash"),
                "aa": _num(t.get("aa")),
                "bwt": _num(t.get("bwt")),
                "fwt": metrics.get("fwt"),
                "forgetting": metrics.get("forgetting"),
                "promoted": t.get("promoted") == "true",
                "gate": t.get("gate"),
                "sequence": t.get("sequence"),
                "source": v.source,
                "run_id": v.run_id,
                "aliases": sorted(a for a, n in aliases.items() if n == int(v.version)),
            }
        )
    tasks = list(dict.fromkeys(v["task"] for v in versions if v["task"]))
    keyed = {metric_key(t): t for t in tasks}
    extra = sorted({k[4:] for m in metrics_of.values() for k in m if k.startswith("acc/")} - set(keyed))
    tasks += extra
    keyed.update({k: k for k in extra})
    matrix = [[metrics_of[v["version"]].get(f"acc/{k}") for k in keyed] for v in versions]
    return {
        "model": model_name,
        "tracking_uri": tracking_uri,
        "aliases": aliases,
        "versions": versions,
        "tasks": tasks,
        "matrix": matrix,
    }


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float | None]:
    """A run's latest metric values, NaN as None (valid JSON); {} for a version without a run or a purged run."""
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except MlflowException:
        return {}
    return {k: None if math.isnan(v) else v for k, v in metrics.items()}


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def render_lineage(report: dict[str, Any], *, wide: bool = False):
    """A rich renderable that reads at 80 columns: per sequence, its versions (stage numbered as ``gorp run`` numbers
    them, the gate's verdict) and its accuracy matrix; ``wide`` adds the method, data digest and source columns."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    aliases = ", ".join(f"@{a} v{n}" for a, n in sorted(report["aliases"].items()))
    parts: list = [f"[bold]{escape(report['model'])}[/]: {len(report['versions'])} version(s); {escape(aliases)}"]
    rows = dict(zip((v["version"] for v in report["versions"]), report["matrix"], strict=True))
    for sequence, versions in _by_sequence(report["versions"]).items():
        n = len(versions)
        chain = Table(
            title=f"sequence {escape((sequence or '-')[:12])}", title_justify="left", box=None, pad_edge=False
        )
        columns = ["ver", "stage", "task", "parent", "AA", "BWT", "aliases", "gate"]
        columns += ["method", "data digest", "source"] if wide else []
        for col in columns:
            right = col in ("ver", "stage", "parent", "AA", "BWT")
            fold = wide and col == "source"
            chain.add_column(
                col,
                justify="right" if right else "left",
                overflow="fold" if fold else "ellipsis",
                no_wrap=not fold,
                max_width=None if wide or col != "gate" else 22,
            )
        for v in versions:
            stage = "-" if v["stage"] is None else f"{v['stage'] + 1}/{n}"
            cells = [
                f"v{v['version']}",
                stage,
                escape(v["task"] or "-"),
                "-" if v["parent_version"] is None else f"v{v['parent_version']}",
                _fmt(v["aa"]),
                _fmt(v["bwt"], signed=True),
                " ".join(f"@{a}" for a in v["aliases"]),
                escape(v.get("gate") or "-"),
            ]
            if wide:
                cells += [escape(v["method"] or "-"), escape((v["data_digest"] or "-")[:12]), escape(v["source"])]
            chain.add_row(*cells)
        parts += ["", chain, _matrix(versions, report["tasks"], rows)]
    return Group(*parts)


def _by_sequence(versions: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    """Versions grouped by the sequence that made them, sequences in the order of their first version."""
    out: dict[str | None, list[dict[str, Any]]] = {}
    for v in sorted(versions, key=lambda v: v["version"]):
        out.setdefault(v.get("sequence"), []).append(v)
    return {
        k: sorted(vs, key=lambda v: (v["stage"] if v["stage"] is not None else -1, v["version"]))
        for k, vs in out.items()
    }


def _matrix(versions: list[dict[str, Any]], tasks: list[str], rows: dict[int, list]):
    """R[version, task] for the tasks these versions scored, task names cut to fit."""
    from rich.markup import escape
    from rich.table import Table

    used = [i for i, _ in enumerate(tasks) if any(rows[v["version"]][i] is not None for v in versions)]
    matrix = Table(title=escape("accuracy R[version, task]"), title_justify="left", box=None)
    matrix.add_column("")
    for i in used:
        matrix.add_column(escape(tasks[i][:9]), justify="right", no_wrap=True)
    for v in versions:
        matrix.add_row(f"v{v['version']}", *(_fmt(rows[v["version"]][i]) for i in used))
    return matrix


def tracking_uri_for(run_dir: str | Path, configured: str | None = None) -> str:
    """The one default of every command: the configured URI, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<absolute run_dir>/mlflow.db``."""
    import os

    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is not there (reading it would create it): read-only commands check first."""
    return not tracking_uri.startswith("sqlite:///") or Path(tracking_uri[len("sqlite:///") :]).is_file()


def lineage_command(
    name: str,
    tracking_uri: str | None = None,
    as_json: bool = False,
    console=None,
    run_dir: str | Path = "runs",
    wide: bool = False,
) -> int:
    """``gorp lineage NAME [--json] [--run-dir DIR | --tracking-uri URI]``: print the report; returns the exit code."""
    from rich.console import Console

    quiet_mlflow_logs()
    uri = tracking_uri_for(run_dir, tracking_uri)
    try:
        if not store_exists(uri):
            raise LookupError(
                f"no tracking store at {uri}: pass --run-dir (the stream's run_dir) or --tracking-uri, or set "
                "MLFLOW_TRACKING_URI"
            )
        report = lineage_report(name, uri)
    except LookupError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        (console or Console()).print(render_lineage(report, wide=wide))
    return 0


def quiet_mlflow_logs() -> None:
    """Silence MLflow's database-migration chatter (alembic INFO lines) on the console."""
    import logging

    for logger in ("alembic", "mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store"):
        logging.getLogger(logger).setLevel(logging.WARNING)


def local_path(source: str) -> Path | None:
    """The local folder a version source names (a path or a file:// URI), or None for a remote URI."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and source[1:3] in (":\\", ":/")):  # a path (or C:\...)
        return Path(source)
    return None


def resolve_version(uri: str, tracking_uri: str):
    """The ModelVersion named by ``models:/NAME/<n>``, ``models:/NAME/latest`` or ``models:/NAME@alias``."""
    m = _URI.match(uri)
    if m is None:
        raise ValueError(f"not a model version URI: {uri!r} (expected models:/NAME/<version> or models:/NAME@alias)")
    name, version, alias = m["name"], m["version"], m["alias"]
    client = client_for(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise _missing_model(name, tracking_uri) from None
        raise
    if version is not None and version.lower() == LATEST:
        alias = LATEST
    if alias is not None:
        mv = by_alias(client, name, alias)
        if mv is None:
            raise LookupError(f"model {name!r} has no alias @{alias} at {tracking_uri}")
        return mv
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise LookupError(f"model {name!r} has no version {version} at {tracking_uri}") from None


MLFLOW_SCHEMES = ("runs", "models", "mlflow-artifacts", "dbfs")  # sources only MLflow can download


def load_version(uri: str, tracking_uri: str, dst_path: str | Path | None = None) -> Path:
    """The local folder of a registered version, for ``gorp.models.load_model``. A source in object storage
    (``s3://``, ``gs://``, ...) is downloaded once into ``dst_path`` (default: ``$GORP_CACHE/remote``); an MLflow
    artifact URI through MLflow. The weight files' sha256 recorded at registration (tag ``weights_sha256``) are
    checked: a mismatch raises :class:`pipelines.integrity.IntegrityError` naming the version and the file."""
    mv = resolve_version(uri, tracking_uri)
    folder = _version_folder(uri, mv, tracking_uri, dst_path)
    if integrity.TAG in mv.tags:  # versions registered before digests were recorded have none
        integrity.check_weights(folder, json.loads(mv.tags[integrity.TAG]), f"{uri} (version {mv.version})")
    return folder


def _version_folder(uri: str, mv, tracking_uri: str, dst_path: str | Path | None) -> Path:
    import mlflow.artifacts

    from pipelines import storage

    path = local_path(mv.source)
    if path is not None:
        if not path.is_dir():
            raise FileNotFoundError(
                f"{uri} (version {mv.version}) points at {str(path)!r}, which no longer exists; the run directory "
                "was moved or deleted"
            )
        return path
    if urlparse(mv.source).scheme not in MLFLOW_SCHEMES:
        try:
            return storage.local_dir(mv.source, dst_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} (version {mv.version}) points at {mv.source}, which is not there") from None
    dst = None if dst_path is None else str(dst_path)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=tracking_uri, dst_path=dst))
