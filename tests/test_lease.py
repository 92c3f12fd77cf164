"""The lease (pipelines/lease.py): processes racing for one lease, exactly one wins; a dead holder (its pid gone, or a
stale heartbeat from another host) is taken over only with ``takeover``; a live one never; the heartbeat refreshes;
S3's conditional writes (moto, in process) give the same answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.lease import Holder, Lease, LeaseHeld, _Local, lease_path

ROOT = Path(__file__).resolve().parents[1]

RACER = """
import sys, time
from pipelines.lease import Lease, LeaseHeld
root, start, takeover = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
while time.time() < start:
    pass
try:
    lease = Lease.acquire(root, "seq", ttl_s=30.0, takeover=takeover, owner="racer")
except LeaseHeld as e:
    print("HELD", e.holder.pid, flush=True)
    sys.exit(0)
print("WON", flush=True)
time.sleep(2.0)  # hold it while the others try
lease.release()
"""

HOLDER = """
import os, sys, time
from pipelines.lease import Lease
lease = Lease.acquire(sys.argv[1], "seq", ttl_s=float(sys.argv[2]), owner="gorp run test")
print("HOLDING", flush=True)
if sys.argv[3] == "die":
    os._exit(0)  # no release: the lease stays, its pid is gone
time.sleep(60)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)


def _race(root: Path, n: int, takeover: bool) -> list[str]:
    start = time.time() + 3.0  # every interpreter is up by then (2 loaded cores)
    procs = [_python(RACER, str(root), str(start), "1" if takeover else "0") for _ in range(n)]
    outs = [p.communicate(timeout=60)[0].split()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outs


def test_racing_processes_exactly_one_wins(tmp_path):
    outs = _race(tmp_path, 4, takeover=False)
    assert sorted(outs) == ["HELD"] * 3 + ["WON"]
    assert Lease.read(str(tmp_path), "seq") is None  # the winner released it


def _dead_lease(tmp_path: Path) -> Holder:
    proc = _python(HOLDER, str(tmp_path), "30", "die")
    assert proc.communicate(timeout=60)[0].strip() == "HOLDING"
    holder = Lease.read(str(tmp_path), "seq")
    assert holder is not None and holder.pid == proc.pid and holder.host == socket.gethostname()
    return holder


def test_dead_holder_taken_over_only_with_takeover(tmp_path):
    dead = _dead_lease(tmp_path)
    assert not dead.alive  # pid gone, heartbeat still fresh
    with pytest.raises(LeaseHeld) as e:
        Lease.acquire(str(tmp_path), "seq", ttl_s=30.0)
    assert e.value.holder.pid == dead.pid and "dead" in str(e.value)
    with Lease.acquire(str(tmp_path), "seq", ttl_s=30.0, takeover=True, owner="me") as lease:
        now = Lease.read(str(tmp_path), "seq")
        assert now.pid == os.getpid() and now.owner == "me" and now.token == lease.holder.token
    assert Lease.read(str(tmp_path), "seq") is None


def test_two_takeovers_of_one_dead_holder_exactly_one_wins(tmp_path):
    _dead_lease(tmp_path)
    assert sorted(_race(tmp_path, 3, takeover=True)) == ["HELD", "HELD", "WON"]


def test_late_takeover_after_another_took_it_over_fails(tmp_path, monkeypatch):
    """B read the dead holder before A took the lease over; B's takeover must not replace A's lease."""
    dead = _dead_lease(tmp_path)
    a = Lease.acquire(str(tmp_path), "seq", ttl_s=30.0, takeover=True, owner="A")
    real_read, calls = _Local.read, []

    def stale_first(self):
        calls.append(1)
        return (dead, None) if len(calls) == 1 else real_read(self)  # acquire read it before A took over

    monkeypatch.setattr(_Local, "read", stale_first)
    with pytest.raises(LeaseHeld):
        Lease.acquire(str(tmp_path), "seq", ttl_s=30.0, takeover=True, owner="B")
    monkeypatch.undo()
    assert Lease.read(str(tmp_path), "seq").token == a.holder.token
    a.release()


def test_live_holder_is_never_taken_over(tmp_path):
    proc = _python(HOLDER, str(tmp_path), "0.6", "live")  # heartbeat every 0.2 s
    try:
        assert proc.stdout.readline().strip() == "HOLDING"
        first = Lease.read(str(tmp_path), "seq")
        time.sleep(1.5)  # more than twice the ttl: only the heartbeat keeps it alive
        with pytest.raises(LeaseHeld) as e:
            Lease.acquire(str(tmp_path), "seq", takeover=True)
        held = e.value.holder
        assert held.alive and held.pid == proc.pid and held.owner == "gorp run test"
        assert held.since == first.since and held.heartbeat > first.heartbeat + 0.5
        assert "host " + socket.gethostname() in str(e.value) and f"pid {proc.pid}" in str(e.value)
    finally:
        proc.kill()
        proc.wait()


def _forge(root: Path, host: str, age_s: float, ttl_s: float = 5.0) -> None:
    """A lease written by a holder on another host whose last heartbeat was ``age_s`` ago."""
    path = Path(lease_path(str(root), "seq"))
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.time() - age_s
    path.write_text(json.dumps(dict(host=host, pid=1, since=t, heartbeat=t, owner="far", ttl_s=ttl_s, token="x" * 32)))


def test_other_host_judged_by_heartbeat(tmp_path):
    _forge(tmp_path, "elsewhere", age_s=1.0)  # pid 1 exists here, but it is not ours to judge: heartbeat fresh
    with pytest.raises(LeaseHeld):
        Lease.acquire(str(tmp_path), "seq", takeover=True)
    _forge(tmp_path, "elsewhere", age_s=6.0)  # older than its ttl
    assert not Lease.read(str(tmp_path), "seq").alive
    Lease.acquire(str(tmp_path), "seq", takeover=True).release()


def test_stalled_holder_learns_it_lost_and_leaves_the_new_file(tmp_path):
    lease = Lease.acquire(str(tmp_path), "seq", ttl_s=0.3)
    lease._stop.set()  # a holder that stalls: no heartbeat
    lease._thread.join()
    time.sleep(0.5)
    with Lease.acquire(str(tmp_path), "seq", ttl_s=30.0, takeover=True, owner="new") as new:
        lease.release()  # the old holder's release must not delete the new holder's lease
        assert Lease.read(str(tmp_path), "seq").token == new.holder.token


def test_s3_conditional_writes(monkeypatch):
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="lease-test")
        root = "s3://lease-test/runs"
        lease = Lease.acquire(root, "seq", ttl_s=0.6, owner="a")
        with pytest.raises(LeaseHeld):
            Lease.acquire(root, "seq", takeover=True)  # live (its heartbeat goes through If-Match)
        time.sleep(1.0)
        assert Lease.read(root, "seq").heartbeat > lease.holder.since
        lease._stop.set()
        lease._thread.join()
        time.sleep(0.8)  # now stale
        with pytest.raises(LeaseHeld):
            Lease.acquire(root, "seq")
        new = Lease.acquire(root, "seq", takeover=True, owner="b")
        assert Lease.read(root, "seq").owner == "b"
        new.release()
        assert Lease.read(root, "seq") is None
