"""``gorp submit``: send ``gorp run`` (or ``retrain``, ``tune``) to a Ray cluster as a Ray Job.

    plan = plan_submission("examples/quickstart.yaml")          # checks the stream, digests the work
    submit(plan, address="http://127.0.0.1:8265", follow=True)   # JobSubmissionClient; exit code of the job

What travels: the stream's folder is the job's ``working_dir`` (the YAML, and the data and model folder it names by
relative paths, which resolve against the YAML's folder there as here), and the project's packages (gorp, pipelines,
tuning, deploy) travel as ``py_modules``, so the job runs the code of this checkout whatever version the cluster has
installed. The job's command is ``python -m deploy.cli run STREAM.yaml`` in the cluster's Python environment, the one
``ray start`` ran from (cluster.yaml installs gorp's dependencies there), with the cluster's environment: the tracking
server (``MLFLOW_TRACKING_URI``) is the cluster's setting or the stream's ``mlflow.tracking_uri``, never this
machine's.

The submission id is ``gorp-<stream name>-<12 hex>``: a digest of the command, its arguments and every file that is
uploaded from the stream's folder (names and contents). Ray refuses a second job with the same id, so the same work
submitted twice runs once; change the data, the stream or the command (``--resume``) and it is new work.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import importlib
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("run", "retrain", "tune")
PACKAGES = ("gorp", "pipelines", "tuning", "deploy")
# Never uploaded (gitignore syntax, as Ray's runtime_env "excludes"): environments, VCS, caches, earlier results.
EXCLUDES = [
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "runs",
    "mlruns",
    "mlflow.db",
]


class SubmitError(RuntimeError):
    """The work cannot be submitted as it is (a file outside the stream's folder, a duplicate, ...)."""


@dataclass(frozen=True)
class Submission:
    submission_id: str
    entrypoint: str
    runtime_env: dict
    stream: Path


def plan_submission(stream_path: str | Path, command: str = "run", args: Sequence[str] = ()) -> Submission:
    """Check the stream and describe the job that runs ``gorp COMMAND STREAM ARGS...`` on a cluster."""
    from pipelines.spec import load_stream

    if command not in COMMANDS:
        raise SubmitError(f"unknown command {command!r}: choose from {', '.join(COMMANDS)}")
    stream_path = Path(stream_path).resolve()
    spec = load_stream(stream_path)  # a bad stream fails here, before anything is uploaded
    folder = stream_path.parent
    _check_inside(folder, _local_inputs(spec))
    excludes = list(EXCLUDES)
    run_dir = _local_run_dir(spec.run_dir, folder)
    if run_dir is not None and run_dir.is_relative_to(folder):  # earlier results: neither uploaded nor digested
        excludes.append("/" + run_dir.relative_to(folder).as_posix())
    words = [command, stream_path.name, *args]
    digest = work_digest(folder, excludes, words)
    runtime_env = {
        "working_dir": str(folder),
        "py_modules": [_package_dir(name) for name in PACKAGES],
        "excludes": excludes,
    }
    return Submission(
        submission_id=f"gorp-{spec.name}-{digest[:12]}",
        entrypoint=shlex.join(["python", "-m", "deploy.cli", *words]),
        runtime_env=runtime_env,
        stream=stream_path,
    )


def work_digest(folder: Path, excludes: Sequence[str], words: Sequence[str]) -> str:
    """sha256 of the command words and of every file under ``folder`` not excluded: relative path and content."""
    h = hashlib.sha256("\0".join(words).encode() + b"\0\0")
    for path in sorted(_files(folder, excludes)):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _files(folder: Path, excludes: Sequence[str]):
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        dirnames[:] = [d for d in dirnames if not excluded(rel / d, excludes)]  # Ray skips an excluded folder whole
        yield from (Path(dirpath, name) for name in filenames if not excluded(rel / name, excludes))


def excluded(rel: Path, excludes: Sequence[str]) -> bool:
    """Whether a path relative to the uploaded folder matches one of the patterns, read as gitignore reads the two
    shapes used here: ``/a/b`` anchored at the folder, ``name`` or ``*.ext`` matching the last part anywhere."""
    for pattern in excludes:
        if pattern.startswith("/"):
            if rel.as_posix() == pattern[1:]:
                return True
        elif fnmatch.fnmatchcase(rel.name, pattern):
            return True
    return False


def _local_run_dir(run_dir, folder: Path) -> Path | None:
    """The run directory as the job sees it (a relative one lands in the job's working directory), or None for a
    URI (object storage)."""
    from pipelines.storage import is_uri

    if is_uri(str(run_dir)):
        return None
    return (folder / Path(run_dir).expanduser()).resolve()


def _local_inputs(spec) -> list[tuple[str, Path]]:
    """(what, path) of every local file or folder the stream reads: the model folder and each task's data."""
    from pipelines.storage import is_uri

    found = [] if spec.model.startswith("demo:") else [("model", Path(spec.model))]
    for task in spec.tasks:
        for split in ("train", "validation", "test"):
            value = getattr(task, split)
            if value is not None and not is_uri(value):
                found.append((f"tasks[{task.name}].{split}", Path(value)))
    return found


def _check_inside(folder: Path, inputs: list[tuple[str, Path]]) -> None:
    outside = [(what, path) for what, path in inputs if not path.resolve().is_relative_to(folder)]
    if outside:
        listing = "; ".join(f"{what}: {path.resolve()}" for what, path in outside)
        raise SubmitError(
            f"the job uploads only the stream's folder {folder}, and these inputs are outside it: {listing}. "
            "Move them beside the stream (relative paths), or put them in object storage (s3://...)."
        )


def _package_dir(name: str) -> str:
    [path] = importlib.import_module(name).__path__
    return path


def submit(plan: Submission, address: str | None = None, follow: bool = False, echo=print) -> int:
    """Submit the job; with ``follow``, stream its logs until it ends. Returns 0 unless the job failed or stopped."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    try:
        client.submit_job(
            entrypoint=plan.entrypoint,
            submission_id=plan.submission_id,
            runtime_env=plan.runtime_env,
            metadata={"gorp_stream": plan.stream.name},
        )
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
        status = client.get_job_status(plan.submission_id)
        raise SubmitError(
            f"this work was already submitted: job {plan.submission_id} is {status}. Ray runs a submission id once; "
            f"its logs: `ray job logs {plan.submission_id} --follow`. To run it again, delete that job "
            f"(`ray job delete {plan.submission_id}`) or change the work (e.g. `gorp submit ... -- --restart`)."
        ) from None
    echo(f"submitted {plan.submission_id}: {plan.entrypoint}")
    if not follow:
        echo(f"follow it with `ray job logs {plan.submission_id} --follow` (address {client.get_address()})")
        return 0
    asyncio.run(_tail(client, plan.submission_id, echo))
    status = client.get_job_status(plan.submission_id)
    while not status.is_terminal():  # the log stream can end a moment before the status is final
        time.sleep(0.5)
        status = client.get_job_status(plan.submission_id)
    echo(f"job {plan.submission_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _tail(client, submission_id: str, echo) -> None:
    async for lines in client.tail_job_logs(submission_id):
        echo(lines, end="")
