"""``gorp run``: a stream's sequence with its recorders — MLflow lineage, the result files, the progress display.

    result = run_stream(load_stream("examples/quickstart.yaml"))     # a pipelines.results.SequenceResult

What to train is decided from MLflow before anything runs. The sequence's identity is its configuration without the
task list (:func:`pipelines.sequence.identity`); the newest sequence with that identity is

* absent (or ``restart``): a new sequence from the stream's model (or ``start_from``);
* complete: its stages are kept and the stream's further tasks, if any, are trained on top (a task appended to the
  stream is one new stage; nothing earlier is retrained);
* interrupted (its parent run did not finish *and* no live run holds its lease): continued with ``resume`` from its
  last completed stage and that stage's last checkpoint; refused otherwise.

A failed start hides nothing: a run that fails (any error but Ctrl-C) leaves no run RUNNING. A parent it reopened from
FINISHED and added no stage to is FINISHED again (the sequence is still complete for its earlier tasks, and a plain
``gorp run`` continues it); any other parent it opened is FAILED. Planning passes over a FAILED or KILLED parent that
completed no stage (a ``--restart`` that failed at its start) to the older sequence of the same configuration, unless
``--resume`` asks for exactly that one.

One live run per sequence: before MLflow is opened, the run takes a lease (:mod:`pipelines.lease`) named after the
stream and the sequence's identity, ``<storage>/leases/<stream>-<identity>.json``, with a heartbeat. A second run (or
``--resume``) of a live sequence is refused with :class:`SequenceRunning`, naming the live run's host, pid and start;
a lease whose owner died is taken over, so a sequence left RUNNING in MLflow while nobody holds its lease is
interrupted. The lease lives in the run's storage (``--storage``, default the run directory) rather than beside the
tracking store: the storage is what every node of a cluster writes stage models to, it is where the atomic create is
(a local/shared path's ``O_EXCL``, S3's conditional PUT), and a tracking *server* offers no compare-and-set at all.
It also serializes the first writes to a fresh SQLite store, which MLflow's schema creation does not survive.
A Ctrl-C marks the sequence's MLflow runs KILLED and raises :class:`RunInterrupted` saying how to resume.

A run that loses its lease (its heartbeat, or the check before each stage is recorded, finds another holder named in
it) stops: :class:`LeaseGuard`, the first callback, raises :class:`pipelines.lease.LeaseLost` naming the new holder
before the recorder sees the stage, so the loser registers no further version and leaves the parent run to the new
holder. The worker group it started ends with its process (``gorp run`` exits; a library caller that goes on should
shut Ray down).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pipelines import storage as stores
from pipelines.lease import Lease, LeaseHeld, LeaseLost
from pipelines.lineage import Lineage, LineageRecorder
from pipelines.preflight import check_remote_code, check_tracking
from pipelines.recorders import ProgressDisplay, ResultsWriter
from pipelines.records import file_digest
from pipelines.registry import store_exists, tracking_uri_for
from pipelines.results import SequenceResult, StageResult
from pipelines.sequence import Callback, check_history, identity, run_sequence


class SequenceExists(RuntimeError):
    """An interrupted sequence with the same configuration exists: resume it or restart explicitly."""


class SequenceRunning(RuntimeError):
    """A live run holds this sequence's lease (``.holder``: host, pid, since)."""

    def __init__(self, message: str, holder):
        super().__init__(message)
        self.holder = holder


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C: the MLflow runs are marked KILLED; ``str()`` says where the run stands and how to resume."""


LEASE_TTL_S = 60.0  # a holder whose heartbeat (every ttl/3) is older than this is dead, whatever its host


def lease_name(stream, ident: str) -> str:
    return f"{stream.name}-{ident}"


def claim(stream, ident: str, root: str, *, resume: bool) -> Lease:
    """The sequence's lease; a dead holder's is taken over (its sequence is then interrupted), a live one refused."""
    name = lease_name(stream, ident)
    try:
        return Lease.acquire(root, name, ttl_s=LEASE_TTL_S, takeover=True, owner=f"gorp run {stream.name}")
    except LeaseHeld as e:
        what = "--resume of" if resume else "a second run of"
        raise SequenceRunning(
            f"{stream.name}: {what} a live sequence is refused: it is being run by {e.holder.describe()}; "
            f"lease {stores.join(root, 'leases', name + '.json')}. Wait for it, or stop it (Ctrl-C) first",
            e.holder,
        ) from None


class LeaseGuard(Callback):
    """The first callback of a run: once the sequence's lease is lost, nothing more is recorded and the run stops
    (at the next step, from the heartbeat; at the latest before a stage is recorded, from a fresh read)."""

    def __init__(self, lease: Lease, stream):
        self.lease, self.stream = lease, stream
        self.started = False  # the recorders were told to open their records (MLflow runs this run may close)

    def on_start(self, plan) -> None:
        self.started = True

    def on_progress(self, plan, stage: int, row) -> None:
        if self.lease.lost.is_set():
            raise self._lost(stage)

    def on_stage_end(self, plan, result: StageResult) -> None:
        if not self.lease.held():
            raise self._lost(result.stage)

    def _lost(self, stage: int) -> LeaseLost:
        now, n = self.lease.current(), len(self.stream.tasks)
        who = f"taken over by {now.describe()}" if now is not None else "removed"
        return LeaseLost(
            f"{self.stream.name}: this run lost the sequence's lease ({self.lease.path}): {who}. It stopped at stage "
            f"{stage + 1}/{n} ({self.stream.tasks[stage].name}) and records nothing more; the sequence is the new "
            "holder's",
            now,
        )


def resolve_start(start_from: str | None, tracking_uri: str) -> str | None:
    """A ``models:/NAME/<n>`` or ``models:/NAME@alias`` as its version's source; a folder or URI as it is."""
    if start_from is None or not start_from.startswith("models:/"):
        return start_from
    from pipelines.registry import resolve_version

    return resolve_version(start_from, tracking_uri).source


def _find(lin: Lineage, stream, ident: str, *, resume: bool) -> str | None:
    """The newest parent run with this identity; without ``resume``, FAILED or KILLED parents that completed no stage
    (failed starts) are passed over when an older parent exists."""
    runs = lin.sequence_runs(stream.name, ident, limit=1 if resume else 100)
    if not runs:
        return None
    if resume:
        return runs[0].info.run_id
    started = (r for r in runs if not _failed_start(lin, r))
    return next(started, runs[0]).info.run_id


def _failed_start(lin: Lineage, run) -> bool:
    return run.info.status in ("FAILED", "KILLED") and not lin.completed_stages(run.info.run_id)


def _plan(lin: Lineage, stream, ident: str, *, resume: bool, restart: bool, say) -> tuple[str | None, str, list, str]:
    """(the parent run to reopen or None, the sequence id, the results of the stages already done, the parent's
    status before this run: "" for a new one)."""
    fresh = restart or not store_exists(lin.tracking_uri)
    existing = None if fresh else _find(lin, stream, ident, resume=resume)
    if existing is None:
        return None, ident if not restart else f"{ident}-{uuid.uuid4().hex[:6]}", [], ""
    sequence_id, status = lin.sequence_info(existing)
    history = [StageResult.load(rec.source) for rec in lin.completed_stages(existing).values()]
    check_history(stream, history, [{"train": file_digest(t.train)} for t in stream.tasks[: len(history)]])
    n = len(stream.tasks)
    if status != "FINISHED" and not resume:
        state = "an interrupted" if status == "RUNNING" else f"a {status.lower()}"
        raise SequenceExists(
            f"{stream.name}: {state} sequence with this configuration exists (MLflow run {existing} at "
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
    return existing, sequence_id, history, status


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
    tracking_uri = tracking_uri_for(run_dir, stream.mlflow.tracking_uri)
    check_tracking(tracking_uri)  # seconds, not MLflow's minutes of retries, and before Ray starts
    if stream.trust_remote_code:
        from pipelines.demo_model import resolve_model

        check_remote_code(resolve_model(stream.model), True)
    start_uri = resolve_start(start_from, tracking_uri)
    ident = identity(stream, method, start_uri)
    lease = claim(stream, ident, stores.normalize(storage or run_dir), resume=resume)
    try:
        ml = stream.mlflow
        lin = Lineage(tracking_uri, ml.experiment, max_forgetting=ml.max_forgetting, new_task_floor=ml.new_task_floor)
        reopen, sequence_id, history, before = _plan(
            lin, stream, ident, resume=resume, restart=restart, say=console.print
        )
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
        display, guard = ProgressDisplay(console), LeaseGuard(lease, stream)
        try:
            return run_sequence(
                stream,
                method=method,
                history=history,
                start_from=start_uri,
                sequence_id=sequence_id,
                callbacks=[guard, display, writer, recorder, *callbacks],
                storage=storage,
                run_dir=run_dir,
                hooks=hooks,
            )
        except KeyboardInterrupt:
            raise RunInterrupted(_killed(stream, recorder, len(history))) from None
        except LeaseLost as e:
            display.on_failure(None, 0, e)  # the bars stop; the parent run is the new holder's now
            _close_stage_runs(recorder, "KILLED", str(e))
            raise
        except Exception as e:
            display.on_failure(None, 0, e)
            if guard.started:
                _close_failed(recorder, before, len(history), e)
            raise
    finally:
        lease.release()


def _close_stage_runs(recorder: LineageRecorder, status: str, error: str | None = None) -> None:
    """This run's stage runs that did not complete and are still RUNNING: ended with ``status``."""
    done = {s.stage for s in recorder.stages}
    for stage, run_id in recorder.run_ids.items():
        if stage not in done and recorder.lin.client.get_run(run_id).info.status == "RUNNING":
            recorder.lin.finish_stage(run_id, status, error=error)


def _close_failed(recorder: LineageRecorder, before: str, first: int, error: BaseException) -> None:
    """After a failure, nothing this run opened stays RUNNING: its unfinished stage runs are FAILED; a parent it
    reopened from FINISHED and added no stage to is FINISHED again (still complete for its earlier tasks); any other
    parent it opened is FAILED."""
    if recorder.parent is None:
        return  # its parent run was never created
    _close_stage_runs(recorder, "FAILED", f"{type(error).__name__}: {error}")
    status = "FINISHED" if before == "FINISHED" and len(recorder.stages) == first else "FAILED"
    if recorder.lin.client.get_run(recorder.parent).info.status != status:
        recorder.lin.finish_sequence(recorder.parent, status)


def _killed(stream, recorder: LineageRecorder, first: int) -> str:
    """Mark the unfinished stage runs and the parent KILLED; the sentence that says where the run stands."""
    n, k = len(stream.tasks), max(first, len(recorder.stages))
    marked = "nothing was recorded yet"
    if recorder.parent is not None:
        _close_stage_runs(recorder, "KILLED")
        recorder.lin.finish_sequence(recorder.parent, "KILLED")
        marked = f"MLflow run {recorder.parent} marked KILLED"
    where = f"stage {k + 1}/{n} ({stream.tasks[k].name}) was running" if k < n else "all stages were done"
    kept = {0: "", 1: "stage 1 is complete and registered; "}.get(k, f"stages 1-{k} are complete and registered; ")
    return f"interrupted: {where}; {kept}{marked}. `gorp run --resume` continues from its last checkpoint"
