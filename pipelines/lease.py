"""A lease: one owner at a time for a named piece of work (a sequence's run, a retraining task), with a heartbeat.

    lease = Lease.acquire(root, "sequence-ab12cd34", ttl_s=60.0)   # LeaseHeld(holder) if someone else holds it
    with Lease.acquire(root, name, takeover=True) as lease: ...    # take over a dead holder's lease
    Lease.read(root, name)                                          # -> Holder | None; Holder.alive

The lease is one small JSON file, ``<root>/leases/<name>.json``, naming its holder (host, pid, owner, since) and its
last heartbeat; a thread rewrites the heartbeat every ``ttl_s / 3`` seconds while the lease is held. A holder is dead
when its heartbeat is older than ``ttl_s`` or, on the same host, when its process is gone. A dead holder's lease is
taken over only when asked (``takeover=True``); a live holder's never.

Atomicity, by storage:

- **Local or shared path** (POSIX: ext4, NFSv3+, Lustre, ...): the lease is created with ``open(O_CREAT | O_EXCL)``,
  so of two processes racing exactly one creates it. A takeover first creates a claim file named after the dead
  holder's token (``O_EXCL`` again: one claimant per dead holder), checks the lease still holds that token, then
  replaces it with a rename.
- **S3** (``s3://``) with ``boto3`` installed: conditional writes, ``If-None-Match: *`` to create and ``If-Match:
  <etag>`` to take over or beat, which S3 (since 2024) and its compatible servers evaluate atomically. pyarrow's
  filesystem has no conditional write (``open_output_stream`` takes only content metadata), so this path uses boto3
  with the same endpoint settings (``AWS_ENDPOINT_URL``, the usual credentials).
- **Any other object store, or S3 without boto3**: pyarrow only, so *no atomic create*: the lease is written when
  absent and read back after a pause (``settle_s``); two owners starting within that window can both believe they
  hold it (last writer wins, and the other learns it at its next heartbeat, which stops). Use a local/shared path or
  S3 with boto3 where this matters.

A holder that loses its lease (taken over after it stalled past ``ttl_s``) sees ``lease.lost`` set at its next
heartbeat; it never overwrites the new holder's file. ``lease.held()`` reads the lease now, for a check that cannot
wait for a heartbeat (before recording work as the holder's); :class:`LeaseLost` is what a holder raises then.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from pipelines import storage


class LeaseHeld(RuntimeError):
    """Someone else holds the lease (``.holder``: alive or, without ``takeover``, dead)."""

    def __init__(self, holder: Holder, name: str = ""):
        self.holder = holder
        self.name = name
        state = "live" if holder.alive else "dead (take it over with takeover/--resume)"
        super().__init__(f"{name or 'lease'} is held by {holder.describe()}, {state}")


class LeaseLost(RuntimeError):
    """The lease was taken over (``.holder``: the new holder) or removed (``.holder`` None) while it was held."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float  # epoch seconds, when the lease was taken
    heartbeat: float  # epoch seconds, the last refresh
    owner: str  # free text: the command and what it runs
    ttl_s: float
    token: str  # unique per acquisition

    @property
    def alive(self) -> bool:
        if time.time() - self.heartbeat > self.ttl_s:
            return False
        return self.host != socket.gethostname() or _pid_alive(self.pid)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
        return f"{self.owner or 'a run'} (host {self.host}, pid {self.pid}, since {since})"

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def lease_path(root: str, name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad lease name {name!r}")
    return storage.join(root, "leases", f"{name}.json")


class Lease:
    """A held lease; ``acquire`` makes one, ``release`` (or leaving a ``with`` block) gives it back."""

    def __init__(self, path: str, name: str, holder: Holder, backend: _Backend):
        self.path, self.name, self.holder = path, name, holder
        self._backend = backend
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(
        cls, root: str, name: str, ttl_s: float = 60.0, takeover: bool = False, owner: str = "", settle_s: float = 1.0
    ) -> Lease:
        path = lease_path(root, name)
        backend = _backend(path, settle_s)
        now = time.time()
        mine = Holder(socket.gethostname(), os.getpid(), now, now, owner, float(ttl_s), uuid.uuid4().hex)
        if backend.create(mine):
            return cls(path, name, mine, backend)
        current, tag = backend.read()
        if current is None:  # released between our create and read: try once more
            if backend.create(mine):
                return cls(path, name, mine, backend)
            current, tag = backend.read()
            if current is None:
                raise RuntimeError(f"lease {path}: could not create it nor read it")
        if current.alive or not takeover:
            raise LeaseHeld(current, name)
        if not backend.replace(current, tag, mine):
            now_held, _ = backend.read()
            raise LeaseHeld(now_held or current, name)
        return cls(path, name, mine, backend)

    @staticmethod
    def read(root: str, name: str) -> Holder | None:
        path = lease_path(root, name)
        return _backend(path, 0.0).read()[0]

    def _beat(self) -> None:
        interval = max(self.holder.ttl_s / 3.0, 0.05)
        while not self._stop.wait(interval):
            current, tag = self._backend.read()
            if current is None or current.token != self.holder.token:
                self.lost.set()
                return
            fresh = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
            if self._backend.replace(current, tag, fresh, heartbeat=True):
                self.holder = fresh
            elif (self._backend.read()[0] or current).token != self.holder.token:
                self.lost.set()  # taken over while we stalled
                return

    def held(self) -> bool:
        """Whether the lease still names this holder, read now rather than at the last heartbeat; sets ``lost``
        when it does not."""
        if not self.lost.is_set():
            current, _ = self._backend.read()
            if current is None or current.token != self.holder.token:
                self.lost.set()
        return not self.lost.is_set()

    def current(self) -> Holder | None:
        """Who holds the lease now (after a loss: the new holder, or None when the file is gone)."""
        return self._backend.read()[0]

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.lost.is_set():
            self._backend.delete(self.holder.token)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Backend:
    def __init__(self, path: str):
        self.path = path

    def create(self, holder: Holder) -> bool:  # True when created, False when it exists
        raise NotImplementedError

    def read(self) -> tuple[Holder | None, object]:  # (holder, a tag for replace)
        raise NotImplementedError

    def replace(self, old: Holder, tag: object, new: Holder, heartbeat: bool = False) -> bool:
        raise NotImplementedError

    def delete(self, token: str) -> None:
        current, _ = self.read()
        if current is not None and current.token == token:
            try:
                self._remove()
            except FileNotFoundError:
                pass

    def _remove(self) -> None:
        fs, p = storage.filesystem(self.path)
        fs.delete_file(p)


def _backend(path: str, settle_s: float) -> _Backend:
    if storage.is_local(path):
        return _Local(path)
    if urlparse(path).scheme in ("s3", "s3a"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            pass
        else:
            return _S3(path)
    return _Pyarrow(path, settle_s)


class _Local(_Backend):
    """O_EXCL create; a takeover claims the dead token with O_EXCL, then renames the new file over the lease."""

    def __init__(self, path: str):
        super().__init__(path)
        self.file = storage.local_path(path)

    def create(self, holder: Holder) -> bool:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(holder)
        try:
            os.link(tmp, self.file)  # atomic, fails when it exists; the file appears whole
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL, then the content
            return self._create_excl(holder)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _create_excl(self, holder: Holder) -> bool:
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(asdict(holder)))
        return True

    def _tmp(self, holder: Holder):
        tmp = self.file.with_name(f".{self.file.name}.{holder.token}.tmp")
        tmp.write_text(json.dumps(asdict(holder)), encoding="utf-8")
        return tmp

    def read(self) -> tuple[Holder | None, object]:
        for _ in range(3):
            try:
                text = self.file.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None, None
            try:
                return Holder.from_json(text), None
            except (ValueError, KeyError, TypeError):  # being written by _create_excl
                time.sleep(0.05)
        raise RuntimeError(f"lease {self.file} is unreadable: remove it if no run holds it")

    def replace(self, old: Holder, tag: object, new: Holder, heartbeat: bool = False) -> bool:
        claim = self.file.with_name(f".{self.file.name}.claim-{old.token}")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            if time.time() - claim.stat().st_mtime < max(old.ttl_s, 1.0):
                return False  # another claimant is replacing it now
            claim.unlink(missing_ok=True)  # a claimant died mid-way: retry once
            return self.replace(old, tag, new, heartbeat)
        try:
            current, _ = self.read()
            if current is None or current.token != old.token or current.heartbeat != old.heartbeat:
                return False
            os.replace(self._tmp(new), self.file)
            return True
        finally:
            claim.unlink(missing_ok=True)


class _S3(_Backend):
    """Conditional PUTs (If-None-Match / If-Match on the ETag) through boto3."""

    def __init__(self, path: str):
        super().__init__(path)
        import boto3

        parsed = urlparse(path)
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")
        self.client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)

    def _put(self, holder: Holder, **cond) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(asdict(holder)).encode(), **cond)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise
        return True

    def create(self, holder: Holder) -> bool:
        return self._put(holder, IfNoneMatch="*")

    def read(self) -> tuple[Holder | None, object]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return Holder.from_json(got["Body"].read().decode()), got["ETag"]

    def replace(self, old: Holder, tag: object, new: Holder, heartbeat: bool = False) -> bool:
        return tag is not None and self._put(new, IfMatch=tag)

    def _remove(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _Pyarrow(_Backend):
    """No conditional write: write when absent, then read back after ``settle_s`` (see the module's docstring)."""

    def __init__(self, path: str, settle_s: float):
        super().__init__(path)
        self.settle_s = settle_s

    def create(self, holder: Holder) -> bool:
        if storage.exists(self.path):
            return False
        storage.write_text(self.path, json.dumps(asdict(holder)))
        time.sleep(self.settle_s)
        current, _ = self.read()
        return current is not None and current.token == holder.token

    def read(self) -> tuple[Holder | None, object]:
        try:
            return Holder.from_json(storage.read_text(self.path)), None
        except FileNotFoundError:
            return None, None

    def replace(self, old: Holder, tag: object, new: Holder, heartbeat: bool = False) -> bool:
        current, _ = self.read()
        if current is None or current.token != old.token:
            return False
        storage.write_text(self.path, json.dumps(asdict(new)))
        if not heartbeat:
            time.sleep(self.settle_s)
        current, _ = self.read()
        return current is not None and current.token == new.token
