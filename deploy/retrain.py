"""``gorp retrain STREAM --inbox DIR [--once | --every 10m]``: each new task dropped into the inbox becomes the next
stage of the stream's sequence, and the promotion gate decides whether it becomes ``champion``.

    gorp retrain examples/quickstart.yaml --inbox /mnt/gorp/inbox --run-dir /mnt/gorp/runs/quickstart --once

A task file is one task entry of the stream format (name, train, test, labels, ...) with its data beside it (relative
paths are read against the inbox) or URIs. One pass, under the stream's lease (:func:`deploy.inbox.stream_lock`), one
task at a time:

1. a claim left unfinished by a watcher that died is resumed first (``run_stream(resume=True)``: the interrupted
   stage continues from its last checkpoint; nothing is registered twice);
2. otherwise the new task files are validated in name order: a bad one moves to ``rejected/`` with its reason (nothing
   trained, the registry untouched); the first good one is claimed atomically (``claimed/``);
3. the stream trained is the stream file with every task learned so far appended (the base stream's tasks, then the
   retrained tasks in the order they were claimed, kept with copies of their training data under
   ``RUN_DIR/retrain/tasks/`` so that later stages can check them), then the new task: :func:`pipelines.run.run_stream`
   continues the completed sequence by exactly one stage, from the latest registered version;
4. the decision (trained, promoted or not and why) is one log line and the tag ``gorp.retrain.decision`` on the new
   version and its stage run; the task moves to ``done/``.

The run directory (the ledger of learned tasks, the tokenized cache) and the tracking store must be shared by every
watcher of the stream: a shared path and an ``mlflow server`` (see the README, "Scheduled retraining").
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from deploy.inbox import Claim, Inbox, copy_task_data, stream_lock
from pipelines.sequence import Callback

DECISION_TAG = "gorp.retrain.decision"
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


class RetrainError(RuntimeError):
    """The inbox, the run directory and the registry disagree, or a setting is invalid."""


def parse_interval(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` or plain seconds, as seconds."""
    m = _INTERVAL.match(text.strip())
    if m is None or float(m[1]) <= 0:
        raise RetrainError(f"--every {text!r}: expected a positive number with s, m, h or d (e.g. 10m)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def log_line(event: str, **fields: Any) -> str:
    """One decision, one line: ``gorp.retrain decision=... task=... key="value with spaces"``."""
    parts = [f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}" for k, v in fields.items()]
    line = f"gorp.retrain decision={event} " + " ".join(parts)
    print(line, flush=True)
    return line


# ------------------------------------------------------------------------------------------------ the stream to train


def _ledger(run_dir: Path) -> Path:
    return run_dir / "retrain" / "tasks"


def learned_tasks(run_dir: Path) -> list[dict]:
    """The retrained tasks so far, in claim order (their entries point at the copies of their data)."""
    folder = _ledger(run_dir)
    files = sorted(folder.glob("*/task.json")) if folder.is_dir() else []
    return [json.loads(f.read_text()) for f in files]


def _record(run_dir: Path, task: dict, index: int) -> dict:
    """Keep the claimed task (its local data copied) in the ledger as entry ``index``; returns its entry."""
    for entry in learned_tasks(run_dir):
        if entry["name"] == task["name"]:
            return entry
    folder = _ledger(run_dir) / f"{index:04d}-{task['name']}"
    local = [task[s] for s in ("train", "validation", "test") if task.get(s) and Path(task[s]).is_file()]
    moved = copy_task_data(local, folder)
    entry = {k: moved.get(v, v) if k in ("train", "validation", "test") else v for k, v in task.items()}
    (folder / "task.json").write_text(json.dumps(entry, indent=1) + "\n")
    return entry


def assemble(base, tasks: list[dict], where: str):
    """The base stream with ``tasks`` (resolved entries) appended."""
    from pipelines.spec import parse_stream

    data = base.model_dump(mode="json")
    data["tasks"] = [*data["tasks"], *tasks]
    return parse_stream(data, where=where)


def validate(task_file: Path, base, learned: list[str], base_dir: Path | None = None) -> tuple[dict | None, str | None]:
    """(the task's resolved entry, None) or (None, why it is refused): YAML, keys, types, a new name, the files and
    every record (as ``gorp validate`` checks them)."""
    from pipelines.records import DataError
    from pipelines.spec import SpecError, check_stream, parse_stream

    try:
        data = yaml.safe_load(task_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"{task_file.name}: cannot read the task: {e}"
    if not isinstance(data, dict):
        return None, f"{task_file.name}: a task file is one task entry (a mapping: name, train, test, ...)"
    if data.get("name") in learned:
        return None, f"{task_file.name}: task {data.get('name')!r} is already learned by {base.name}"
    try:
        one = parse_stream(
            {**base.model_dump(mode="json"), "tasks": [data]},
            base_dir=base_dir or task_file.parent,
            where=task_file.name,
        )
        check_stream(one)
    except (SpecError, DataError) as e:
        return None, str(e).replace("tasks.0.", "")
    return one.tasks[0].model_dump(mode="json"), None


def check_chain(stream, tracking_uri: str) -> None:
    """The registry's newest version must have learned a prefix of the stream's tasks (else the ledger in this run
    directory is not the one the registry's chain was trained from)."""
    from pipelines.registry import LATEST, by_alias, client_for, store_exists

    if not store_exists(tracking_uri):
        return
    latest = by_alias(client_for(tracking_uri), stream.name, LATEST)
    if latest is None:
        return
    learned = [t for t in latest.tags.get("tasks", "").split(",") if t]
    names = [t.name for t in stream.tasks]
    if names[: len(learned)] != learned:
        raise RetrainError(
            f"{stream.name} version {latest.version} learned {learned}; the stream file and the ledger under this "
            f"run directory give {names}: pass the run directory the chain was trained in"
        )


def check_start(stream, tracking_uri: str, start: str) -> None:
    """``start="champion"``: continue only while the champion is the newest version (see the README)."""
    from pipelines.registry import CHAMPION, LATEST, by_alias, client_for, store_exists

    if start == "latest" or not store_exists(tracking_uri):
        return
    if start != "champion":
        raise RetrainError(f"--from {start!r}: use latest or champion")
    client = client_for(tracking_uri)
    champion, latest = by_alias(client, stream.name, CHAMPION), by_alias(client, stream.name, LATEST)
    if latest is not None and (champion is None or champion.version != latest.version):
        raise RetrainError(
            f"--from champion: {stream.name}'s champion is version {getattr(champion, 'version', None)}, the newest is "
            f"{latest.version} (the gate refused the versions after it); continuing from an older champion would "
            "start a new sequence that the gate cannot compare with it. Retrain with --from latest, or restart"
        )


class Decisions(Callback):
    """Tags the new task's version and stage run with the gate's verdict, as one log line each."""

    def __init__(self, task: str, tracking_uri: str, claim: Claim):
        self.task, self.tracking_uri, self.claim = task, tracking_uri, claim
        self.decision: dict[str, Any] = {}

    def on_stage_end(self, plan, result) -> None:
        self.decide(plan.stream.name, result.task, result.stage)

    def decide(self, name: str, task: str, stage: int) -> None:
        """Log and tag the verdict on ``task``'s version (also for a stage registered before a watcher died)."""
        from pipelines.registry import client_for

        client = client_for(self.tracking_uri)
        found = client.search_model_versions(f"name='{name}' and tags.task='{task}'")
        mv = max(found, key=lambda v: int(v.version))
        promoted = mv.tags.get("promoted") == "true"
        event = ("promoted" if promoted else "not-promoted") if task == self.task else "trained"
        text = f"{event}: version {mv.version}, stage {stage + 1}, gate {mv.tags.get('gate', '')}"
        client.set_model_version_tag(name, mv.version, DECISION_TAG, text)
        if mv.run_id:
            client.set_tag(mv.run_id, DECISION_TAG, text)
        fields = {
            "task": task,
            "version": int(mv.version),
            "stage": stage + 1,
            "aa": mv.tags.get("aa"),
            "gate": mv.tags.get("gate", ""),
            "file": self.claim.yaml.name,
        }
        log_line(event, **fields)
        if task == self.task:
            self.decision = {"decision": event, **fields}

    def on_failure(self, plan, stage: int, error) -> None:
        log_line(
            "failed",
            task=plan.tasks[stage],
            stage=stage + 1,
            file=self.claim.yaml.name,
            error=str(error or "the worker group ended")[-300:].replace("\n", " "),
        )


# ------------------------------------------------------------------------------------------------------- one pass


def _data_files(entry: dict, inbox: Path) -> list[Path]:
    return [Path(entry[s]) for s in ("train", "validation", "test") if entry.get(s) and Path(entry[s]).parent == inbox]


def _next_claim(inbox: Inbox, base, learned: list[str]) -> tuple[Claim | None, dict | None]:
    """A claim to train: an unfinished one first (resumed), else the first valid new task (bad ones rejected)."""
    for claim in inbox.claimed():
        name = _task_name(claim.yaml)
        entry, reason = validate(claim.yaml, base, [n for n in learned if n != name], base_dir=inbox.root)
        if entry is None:  # it was valid when claimed: something changed under it
            inbox.reject(claim.yaml, reason, [inbox.root / n for n in _named_files(claim.yaml)])
            (inbox.root / "claimed" / f"{claim.stem}.owner.json").unlink(missing_ok=True)
            log_line("rejected", file=claim.yaml.name, reason=reason.replace("\n", "; "))
            continue
        log_line(
            "resume",
            task=entry["name"],
            file=claim.yaml.name,
            claimed_by=claim.holder.get("host", "?"),
            pid=claim.holder.get("pid"),
            since=claim.holder.get("since"),
        )
        return claim, entry
    for task_file in inbox.new_tasks():
        entry, reason = validate(task_file, base, learned)
        if entry is None:
            inbox.reject(task_file, reason, [inbox.root / n for n in _named_files(task_file)])
            log_line("rejected", file=task_file.name, reason=reason.replace("\n", "; "))
            continue
        claim = inbox.claim(task_file)
        if claim is not None:
            log_line("claimed", task=entry["name"], file=task_file.name)
            return claim, entry
    return None, None


def _task_name(task_file: Path) -> str | None:
    try:
        data = yaml.safe_load(task_file.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable: validate says why
        return None
    return data.get("name") if isinstance(data, dict) else None


def _named_files(task_file: Path) -> list[str]:
    """The data files a rejected task file names in the inbox, to move beside it into rejected/ (those another
    waiting task also names stay)."""
    others = [p for p in [*task_file.parent.glob("*.y*ml"), *task_file.parent.glob("claimed/*.y*ml")] if p != task_file]
    shared = {n for p in others for n in _mentioned(p)}
    return [n for n in _mentioned(task_file) if n not in shared]


def _mentioned(task_file: Path) -> list[str]:
    try:
        data = yaml.safe_load(task_file.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable: nothing named
        return []
    if not isinstance(data, dict):
        return []
    return [
        Path(str(data[s])).name
        for s in ("train", "validation", "test")
        if isinstance(data.get(s), str) and "/" not in data[s]
    ]


def retrain_once(
    stream_file: str | Path,
    inbox: str | Path,
    *,
    run_dir: str | Path | None = None,
    storage: str | None = None,
    start: str = "latest",
    hooks: Any = None,
    console=None,
    lock_ttl_s: float = 60.0,
) -> list[dict]:
    """Train every task waiting in the inbox, one stage each, in order; returns their decisions. Raises
    :class:`pipelines.sequence.StageFailed` when a stage fails (its claim stays, and is resumed next time)."""
    from pipelines.registry import quiet_mlflow_logs, tracking_uri_for
    from pipelines.run import run_stream
    from pipelines.spec import load_stream
    from pipelines.storage import is_uri

    if is_uri(str(inbox)):
        raise RetrainError(f"--inbox {inbox}: the inbox must be a local or shared path (object-store inboxes: not yet)")
    quiet_mlflow_logs()
    base = load_stream(stream_file)
    box = Inbox(inbox)
    run_dir = Path(run_dir or base.run_dir).resolve()
    tracking_uri = tracking_uri_for(run_dir, base.mlflow.tracking_uri)
    decisions = []
    while True:
        with stream_lock(box.root, base.name, ttl_s=lock_ttl_s):
            ledger = learned_tasks(run_dir)
            learned = [t.name for t in base.tasks] + [t["name"] for t in ledger]
            claim, entry = _next_claim(box, base, learned)
            if claim is None:
                return decisions
            data = _data_files(entry, box.root)
            entry = _record(run_dir, entry, len(learned))  # a resumed task keeps its entry
            tasks = [t for t in ledger if t["name"] != entry["name"]] + [entry]
            stream = assemble(base, tasks, where=str(stream_file))
            check_chain(stream, tracking_uri)
            check_start(stream, tracking_uri, start)
            listener = Decisions(entry["name"], tracking_uri, claim)
            run_stream(
                stream,
                run_dir=run_dir,
                resume=True,
                storage=storage,
                console=console,
                callbacks=[listener],
                hooks=hooks,
            )
            if not listener.decision:  # registered by a watcher that died before it moved the task to done/
                listener.decide(stream.name, entry["name"], len(stream.tasks) - 1)
            decision = listener.decision
            box.finish(claim, decision, data)
            decisions.append(decision)


def retrain_every(stream_file, inbox, interval_s: float, **kwargs) -> None:  # pragma: no cover - runs forever
    """A pass now, then one every ``interval_s`` seconds (a failed stage is logged; its claim is resumed next pass)."""
    from pipelines.sequence import StageFailed

    while True:
        try:
            retrain_once(stream_file, inbox, **kwargs)
        except StageFailed as e:
            print(f"gorp.retrain: {e}", file=sys.stderr, flush=True)
        time.sleep(interval_s)
