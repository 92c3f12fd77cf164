"""The retraining inbox on a local or shared path: claims, outcomes and the per-stream lock.

    inbox/
      NAME.yaml, NAME.train.jsonl, ...    a new task (one task entry of the stream format) with its data beside it
      claimed/NAME.yaml + NAME.owner.json claimed: being trained (or abandoned by a watcher that died: resumed next)
      done/NAME.yaml + NAME.decision.json trained; what the gate decided
      rejected/NAME.yaml + NAME.reason.txt failed validation; nothing was trained on it
      leases/retrain-STREAM.json          the lease of the one watcher training the stream (pipelines.lease)

Every transition is one atomic filesystem operation: a claim is an exclusive create of its owner file (two watchers:
one wins, the other gets ``FileExistsError``) followed by a rename. The stream's lease (an exclusive create with a
heartbeat) keeps the stages of one chain in order: one watcher trains at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.lease import Lease, LeaseHeld

CLAIMED, DONE, REJECTED = "claimed", "done", "rejected"
TASK_SUFFIXES = (".yaml", ".yml")


def owner() -> dict:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": since}


@contextmanager
def stream_lock(inbox: Path, name: str, ttl_s: float = 60.0, poll_s: float = 1.0) -> Iterator[Lease]:
    """Hold the stream's retraining lease (``INBOX/leases/retrain-NAME.json``, :mod:`pipelines.lease`), waiting while
    a live watcher holds it; a dead holder's (its process gone, or no heartbeat for ``ttl_s``) is taken over."""
    while True:
        try:
            lease = Lease.acquire(
                str(inbox), f"retrain-{name}", ttl_s=ttl_s, takeover=True, owner=f"gorp retrain {name}"
            )
            break
        except LeaseHeld:
            time.sleep(poll_s)
    try:
        yield lease
    finally:
        lease.release()


@dataclass
class Claim:
    stem: str  # the task file's name without its suffix
    yaml: Path  # where the task file is now (claimed/STEM.yaml)
    holder: dict  # who claimed it (host, pid, since)


class Inbox:
    """The folders of an inbox (created on first use) and the moves between them."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        for sub in (CLAIMED, DONE, REJECTED):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def new_tasks(self) -> list[Path]:
        """Task files not yet claimed, in name order (the order they become stages)."""
        return sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix in TASK_SUFFIXES)

    def claimed(self) -> list[Claim]:
        """Claims not finished (their owner died or is still training), oldest first."""
        out = []
        for f in (self.root / CLAIMED).glob("*.owner.json"):
            stem = f.name[: -len(".owner.json")]
            holder = json.loads(f.read_text() or "{}")
            yaml = next((p for p in self._candidates(stem) if p.is_file()), None)
            if yaml is not None:
                out.append(Claim(stem, yaml, holder))
        return sorted(out, key=lambda c: (c.holder.get("since", ""), c.stem))

    def claim(self, task_file: Path) -> Claim | None:
        """Claim a new task atomically; None when another watcher claimed it first."""
        stem = task_file.stem
        owner_file = self.root / CLAIMED / f"{stem}.owner.json"
        try:
            fd = os.open(owner_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        who = owner()
        with os.fdopen(fd, "w") as f:
            json.dump(who, f)
        dst = self.root / CLAIMED / task_file.name
        try:
            os.rename(task_file, dst)
        except FileNotFoundError:  # moved away (rejected) by another watcher
            owner_file.unlink(missing_ok=True)
            return None
        return Claim(stem, dst, who)

    def finish(self, claim: Claim, decision: dict, data: list[Path]) -> Path:
        """The claimed task and its data files move to ``done/`` with its decision; the claim ends."""
        dst = self.root / DONE
        (dst / f"{claim.stem}.decision.json").write_text(json.dumps(decision, indent=1) + "\n")
        for path in data:
            if path.is_file() and path.parent == self.root:
                os.replace(path, dst / path.name)
        os.replace(claim.yaml, dst / claim.yaml.name)
        (self.root / CLAIMED / f"{claim.stem}.owner.json").unlink(missing_ok=True)
        return dst / claim.yaml.name

    def reject(self, task_file: Path, reason: str, data: list[Path]) -> Path:
        """A task that failed validation moves to ``rejected/`` (with its data) beside a file saying why."""
        dst = self.root / REJECTED
        (dst / f"{task_file.stem}.reason.txt").write_text(reason.rstrip() + "\n")
        for path in data:
            if path.is_file() and path.parent == self.root:
                os.replace(path, dst / path.name)
        os.replace(task_file, dst / task_file.name)
        return dst / task_file.name

    def _candidates(self, stem: str) -> list[Path]:
        # a claim interrupted between its owner file and its rename leaves the task file in the inbox
        return [self.root / sub / f"{stem}{s}" for sub in (CLAIMED, ".") for s in TASK_SUFFIXES]


def copy_task_data(paths: list[str], folder: Path) -> dict[str, str]:
    """Copy local data files into ``folder`` (the run's record of what was learned); returns old -> new path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in paths:
        dst = folder / Path(p).name
        if not dst.exists():
            shutil.copy2(p, dst)
        out[p] = str(dst)
    return out
