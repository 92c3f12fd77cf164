"""`gorp retrain`: two watchers on one inbox and one `mlflow server` train each task exactly once, as one chain of
versions; malformed tasks land in rejected/ with their reason; a watcher killed mid-stage is resumed from its
checkpoint by the next `--once`, with no duplicate version.

The watchers are separate processes (`python -m deploy.cli retrain`), each with its own local Ray. With a tracking
server, MLflow refuses a local folder as a model version source (it must lie inside the run's artifact directory), so
the shared-server test keeps the runs' storage in S3 (moto's server on 127.0.0.1) and the server's artifact root in
the same bucket, as on a cluster."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from test_recovery import _checkpointed, _progress, _wait_for

from deploy.inbox import Inbox, stream_lock
from deploy.retrain import DECISION_TAG, parse_interval, retrain_once
from pipeline_fixtures import make_stream, s3_server, write_task
from pipelines.lease import Lease, LeaseHeld
from pipelines.registry import tracking_uri_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "gorp-retrain"
TINY = {"num_workers": 1, "fsdp": False, "max_steps": 4, "n_train": 16, "n_test": 8}


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inbox(root: Path, names: list[str], n_train: int = 16, n_test: int = 8) -> Path:
    """Task files NN-NAME.yaml (the order they become stages) with their data beside them."""
    inbox = root / "inbox"
    inbox.mkdir()
    for i, name in enumerate(names):
        (inbox / f"{i:02d}-{name}.yaml").write_text(yaml.safe_dump(write_task(inbox, name, n_train, n_test)))
    return inbox


def _versions(client: MlflowClient, name: str = "tiny-stream") -> list:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def test_parse_interval():
    assert [parse_interval(t) for t in ("90", "90s", "10m", "2h", "1d", "0.5m")] == [90, 90, 600, 7200, 86400, 30]
    for bad in ("", "10x", "-5m", "0s", "m"):
        with pytest.raises(RuntimeError):
            parse_interval(bad)


def test_a_claim_is_won_once(tmp_path):
    inbox = _inbox(tmp_path, ["second"])
    a, b = Inbox(inbox), Inbox(inbox)
    task = a.new_tasks()[0]
    first, second = a.claim(task), b.claim(task)
    assert first is not None and second is None
    assert first.yaml == inbox / "claimed" / task.name and first.holder["pid"] == os.getpid()
    assert [c.stem for c in b.claimed()] == [task.stem] and b.new_tasks() == []


def test_one_watcher_holds_the_stream_at_a_time(tmp_path):
    got = []
    with stream_lock(tmp_path, "s"):
        with pytest.raises(LeaseHeld):  # a live holder is never taken over
            Lease.acquire(str(tmp_path), "retrain-s", takeover=True)
        waiter = threading.Thread(target=lambda: _hold(tmp_path, got))
        waiter.start()
        time.sleep(1.0)
        assert got == []  # still waiting
        released = time.time()
    waiter.join(timeout=10)
    assert got and got[0] >= released


def _hold(root, got):
    with stream_lock(root, "s", poll_s=0.05):
        got.append(time.time())


def test_only_bad_tasks_are_rejected_and_nothing_is_recorded(tmp_path):
    stream = make_stream(tmp_path, tasks=["first"], **TINY)
    inbox = _inbox(tmp_path, [])
    (inbox / "a.yaml").write_text("name: a\ntrain: a.train.jsonl\n  test: [unclosed\n")
    (inbox / "b.yaml").write_text("- just\n- a list\n")
    (inbox / "c.yaml").write_text("name: first\ntrain: c.train.jsonl\ntest: c.train.jsonl\n")
    (inbox / "c.train.jsonl").write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    (inbox / "d.yaml").write_text("name: d\ntrain: nowhere.train.jsonl\ntest: nowhere.test.jsonl\n")
    assert retrain_once(stream, inbox, run_dir=tmp_path / "run") == []
    reasons = {p.name: p.read_text() for p in (inbox / "rejected").glob("*.reason.txt")}
    assert set(reasons) == {"a.reason.txt", "b.reason.txt", "c.reason.txt", "d.reason.txt"}
    assert "invalid YAML" in reasons["a.reason.txt"] or "cannot read the task" in reasons["a.reason.txt"]
    assert "one task entry" in reasons["b.reason.txt"]
    assert "'first' is already learned" in reasons["c.reason.txt"]
    assert "train: file not found" in reasons["d.reason.txt"] and "nowhere.train.jsonl" in reasons["d.reason.txt"]
    assert sorted(p.name for p in (inbox / "rejected").iterdir() if not p.name.endswith(".txt")) == [
        "a.yaml",
        "b.yaml",
        "c.train.jsonl",
        "c.yaml",
        "d.yaml",
    ]
    assert not (tmp_path / "run").exists()  # no tracking store, no ledger: nothing was recorded


@pytest.fixture
def s3():
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture
def tracking_server(s3, tmp_path):
    """`mlflow server` on 127.0.0.1: a SQLite database, the artifact root in the runs' bucket; its log file."""
    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'tracking.db'}",
        "--default-artifact-root",
        f"s3://{BUCKET}/mlflow",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(**s3), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _answers(uri) or proc.poll() is not None, 300, "mlflow server did not answer")
        assert proc.poll() is None, log.read_text()[-2000:]
        yield uri, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:  # uvicorn's worker lingering on a loaded machine
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _answers(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_two_watchers_share_one_inbox_and_one_tracking_server(s3, tracking_server, tmp_path):
    uri, server_log = tracking_server
    stream = make_stream(tmp_path, tasks=["first"], **TINY)
    inbox = _inbox(tmp_path, ["second", "animal", "bird"])
    (inbox / "03-typo.yaml").write_text("name: typo\ntrain: x.train.jsonl\ntest: x.test.jsonl\nlables: [a, b]\n")
    bad = {
        "name": "badrecord",
        "train": "badrecord.train.jsonl",
        "test": "badrecord.train.jsonl",
        "labels": ["red", "blue"],
    }
    (inbox / "badrecord.train.jsonl").write_text('{"instruction": "Name it.", "input": "sky", "output": "green"}\n')
    (inbox / "04-badrecord.yaml").write_text(yaml.safe_dump(bad))
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "retrain",
        str(stream),
        "--inbox",
        str(inbox),
        "--run-dir",
        str(tmp_path / "run"),
        "--storage",
        f"s3://{BUCKET}/runs",
        "--once",
    ]
    env = _env(MLFLOW_TRACKING_URI=uri, **s3)
    procs = [
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for _ in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    logs = "\n".join(outs)
    assert "database is locked" not in logs + server_log.read_text()

    # each valid task claimed and trained exactly once, as the next stage of one chain (first: the stream's own)
    claimed = [line for line in logs.splitlines() if "decision=claimed" in line]
    assert sorted(line.split("task=")[1].split()[0] for line in claimed) == ["animal", "bird", "second"]
    client = MlflowClient(uri)
    versions = _versions(client)
    assert [v.tags["task"] for v in versions] == ["first", "second", "animal", "bird"]
    assert [v.tags["parent_version"] for v in versions] == ["", "1", "2", "3"]
    assert [v.tags["tasks"] for v in versions][-1] == "first,second,animal,bird"
    assert all(v.source.startswith(f"s3://{BUCKET}/runs/") for v in versions)
    for v in versions[1:]:
        decision = v.tags[DECISION_TAG]
        verdict = "promoted" if v.tags["promoted"] == "true" else "not-promoted"
        assert decision.startswith(f"{verdict}: version {v.version}") and v.tags["gate"] in decision
        assert client.get_run(v.run_id).data.tags[DECISION_TAG] == decision
        line = next(x for x in logs.splitlines() if f"decision={verdict} task={v.tags['task']} " in x)
        assert f"version={v.version} " in line
    done = sorted(p.name for p in (inbox / "done").iterdir())
    assert done == sorted(
        [f"{s}.{e}" for s in ("00-second", "01-animal", "02-bird") for e in ("yaml", "decision.json")]
        + [f"{n}.{s}.jsonl" for n in ("second", "animal", "bird") for s in ("train", "test")]
    )
    for stem, version in (("00-second", 2), ("01-animal", 3), ("02-bird", 4)):
        assert json.loads((inbox / "done" / f"{stem}.decision.json").read_text())["version"] == version
    assert list((inbox / "claimed").iterdir()) == []

    # the malformed tasks: in rejected/ with their reason, nothing trained on them, nothing left in the inbox
    reasons = {p.name: p.read_text() for p in (inbox / "rejected").glob("*.reason.txt")}
    assert set(reasons) == {"03-typo.reason.txt", "04-badrecord.reason.txt"}
    assert "lables: unknown key" in reasons["03-typo.reason.txt"]
    assert "badrecord.train.jsonl:1" in reasons["04-badrecord.reason.txt"]
    assert "green" in reasons["04-badrecord.reason.txt"]
    assert (inbox / "rejected" / "badrecord.train.jsonl").is_file()
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == []
    assert sum("decision=rejected" in line for line in logs.splitlines()) == 2


def test_killed_watcher_is_resumed_from_its_checkpoint(tmp_path):
    stream = make_stream(tmp_path, tasks=["first"], **{**TINY, "max_steps": 8}, training={"checkpoint_every": 2})
    inbox = _inbox(tmp_path, ["second"])
    run_dir = tmp_path / "run"
    driver = [sys.executable, str(ROOT / "tests" / "retrain_main.py"), str(stream), str(inbox), str(run_dir)]
    proc = subprocess.Popen(
        [*driver, "--step-sleep", "0.5"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:  # kill once the inbox task's stage has a committed checkpoint and has trained past it
        _wait_for(
            lambda: (
                (_checkpointed(run_dir, 1) and _progress(run_dir, 1) > _checkpointed(run_dir, 1))
                or proc.poll() is not None
            ),
            400,
            "the inbox task's stage did not get past its first checkpoint",
        )
        committed = _checkpointed(run_dir, 1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own: the asserts below say how
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed in (2, 4, 6), proc.stdout.read().decode()[-3000:]
    client = MlflowClient(tracking_uri_for(run_dir))
    assert [v.tags["task"] for v in _versions(client)] == ["first"]  # the new task's stage was interrupted
    owner = json.loads((inbox / "claimed" / "00-second.owner.json").read_text())
    assert owner["pid"] == proc.pid and (inbox / "claimed" / "00-second.yaml").is_file()

    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "retrain",
        str(stream),
        "--inbox",
        str(inbox),
        "--run-dir",
        str(run_dir),
        "--once",
    ]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"decision=resume task=second file=00-second.yaml claimed_by={owner['host']} pid={proc.pid}" in out.stdout
    assert "decision=claimed" not in out.stdout
    stage = json.loads(next(run_dir.glob("sequences/*/01-second/model/stage.json")).read_text())
    assert stage["resumed_from"] >= committed and stage["steps"] == 8  # from the checkpoint, not from step 0
    versions = _versions(client)
    assert [v.tags["task"] for v in versions] == ["first", "second"]  # no duplicate version
    assert [v.tags["parent_version"] for v in versions] == ["", "1"]
    assert sorted(p.name for p in (inbox / "done").glob("*.yaml")) == ["00-second.yaml"]
    assert list((inbox / "claimed").iterdir()) == []
