"""``gorp run``: a stream's sequence with its recorders — MLflow lineage, the result files, the progress display.

    result = run_stream(load_stream("examples/quickstart.yaml"))     # a pipelines.results.SequenceResult

What to train is decided from MLflow before anything runs. The sequence's identity is its configuration without the
task list (:func:`pipelines.sequence.identity`); the newest sequence with that identity is

* absent (or ``restart``): a new sequence from the stream's model (or ``start_from``);
* complete: its stages are kept and the stream's further tasks, if any, are trained on top (a task appended to the
  stream is one new stage; nothing earlier is retrained);
* interrupted (its parent run did not finish): continued with ``resume`` from its last completed stage and that
  stage's last checkpoint; refused otherwise.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pipelines.lineage import Lineage, LineageRecorder
from pipelines.recorders import ProgressDisplay, ResultsWriter
from pipelines.records import file_digest
from pipelines.registry import store_exists, tracking_uri_for
from pipelines.results import SequenceResult, StageResult
from pipelines.sequence import check_history, identity, run_sequence


class SequenceExists(RuntimeError):
    """An interrupted sequence with the same configuration exists: resume it or restart explicitly."""


def resolve_start(start_from: str | None, tracking_uri: str) -> str | None:
    """A ``models:/NAME/<n>`` or ``models:/NAME@alias`` as its version's source; a folder or URI as it is."""
    if start_from is None or not start_from.startswith("models:/"):
        return start_from
    from pipelines.registry import resolve_version

    return resolve_version(start_from, tracking_uri).source


def _plan(lin: Lineage, stream, ident: str, *, resume: bool, restart: bool, say) -> tuple[str | None, str, list]:
    """(the parent run to reopen or None, the sequence id, the results of the stages already done)."""
    fresh = restart or not store_exists(lin.tracking_uri)
    existing = None if fresh else lin.find_sequence(stream.name, ident)
    if existing is None:
        return None, ident if not restart else f"{ident}-{uuid.uuid4().hex[:6]}", []
    sequence_id, status = lin.sequence_info(existing)
    history = [StageResult.load(rec.source) for rec in lin.completed_stages(existing).values()]
    check_history(stream, history, [{"train": file_digest(t.train)} for t in stream.tasks[: len(history)]])
    n = len(stream.tasks)
    if status != "FINISHED" and not resume:
        raise SequenceExists(
            f"{stream.name}: an interrupted sequence with this configuration exists (MLflow run {existing} at "
            f"{lin.tracking_uri}, {len(history)} stage(s) complete); continue it with `gorp run --resume`, or start "
            "a new one with `--restart`"
        )
    if status != "FINISHED":
        say(f"resuming {stream.name} ({sequence_id}) at stage {len(history) + 1}/{n}")
    elif len(history) < n:
        say(
            f"continuing {stream.name} ({sequence_id}): {len(history)} stage(s) done, training stage "
            f"{len(history) + 1}/{n} ({stream.tasks[len(history)].name}) from stage {len(history)}'s model"
        )
    return existing, sequence_id, history


def run_stream(
    stream,
    *,
    method: str | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    start_from: str | None = None,
    storage: str | None = None,
    console=None,
    callbacks=(),
    hooks=None,
) -> SequenceResult:
    """Train what the stream adds to its sequence (see the module docstring), recording every stage; ``callbacks``
    listen besides the recorders (see :class:`pipelines.sequence.Callback`)."""
    from rich.console import Console

    console = console or Console()
    method = method or stream.method
    run_dir = Path(run_dir or stream.run_dir).resolve()
    ml = stream.mlflow
    tracking_uri = tracking_uri_for(run_dir, ml.tracking_uri)
    start_uri = resolve_start(start_from, tracking_uri)
    ident = identity(stream, method, start_uri)
    lin = Lineage(tracking_uri, ml.experiment, max_forgetting=ml.max_forgetting, new_task_floor=ml.new_task_floor)
    reopen, sequence_id, history = _plan(lin, stream, ident, resume=resume, restart=restart, say=console.print)
    if start_uri is not None and not history:
        console.print(f"starting {stream.name} ({sequence_id}) from {start_from}: {start_uri}")
    writer = ResultsWriter(run_dir)
    if len(history) == len(stream.tasks) and reopen is not None:
        console.print(
            f"[green]sequence {stream.name} ({sequence_id}) is complete: {len(history)} stages; nothing to do"
        )
        result = SequenceResult(stream.name, sequence_id, [t.name for t in stream.tasks], history)
        writer.write(result)
        return result
    recorder = LineageRecorder(lin, ident, run_dir=run_dir, reopen=reopen, say=console.print)
    return run_sequence(
        stream,
        method=method,
        history=history,
        start_from=start_uri,
        sequence_id=sequence_id,
        callbacks=[ProgressDisplay(console), writer, recorder, *callbacks],
        storage=storage,
        run_dir=run_dir,
        hooks=hooks,
    )
