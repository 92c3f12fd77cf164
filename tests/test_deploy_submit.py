"""`gorp submit`: the submission id is a digest of the work, and a Ray Job on a real (local) head runs a tiny stream
to completion; the same work submitted again is refused by Ray.

The head is a `ray start --head --block` of its own (free ports, its own short --temp-dir, token authentication with
a token made here) in its own session; it is stopped with SIGTERM to that process, and anything left whose command
line names its temp dir is killed by pid. `ray stop` is not used: it stops every Ray instance of the user."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy.submit import SubmitError, plan_submission
from pipeline_fixtures import make_stream

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- the submission id, without Ray


def test_submission_id_is_a_digest_of_the_work(tmp_path):
    stream = make_stream(tmp_path / "s", num_workers=1, fsdp=False, max_steps=2)
    first = plan_submission(stream)
    prefix, digest = first.submission_id[:17], first.submission_id[17:]
    assert prefix == "gorp-tiny-stream-" and len(digest) == 12 and int(digest, 16) >= 0
    assert first.entrypoint == "python -m deploy.cli run stream.yaml"
    assert first.runtime_env["working_dir"] == str(stream.parent)
    assert [Path(p).name for p in first.runtime_env["py_modules"]] == ["gorp", "pipelines", "tuning", "deploy"]
    assert "/run" in first.runtime_env["excludes"]  # the stream's run_dir is inside its folder here

    # the same work: same id, also after a run wrote results into the (excluded) run_dir
    (stream.parent / "run").mkdir()
    (stream.parent / "run" / "results.json").write_text("{}")
    assert plan_submission(stream).submission_id == first.submission_id
    # other work: other arguments, another command, a changed data file, an added file
    assert plan_submission(stream, args=["--resume"]).submission_id != first.submission_id
    assert plan_submission(stream, command="tune").submission_id != first.submission_id
    data = stream.parent / yaml.safe_load(stream.read_text())["tasks"][-1]["train"]
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-1]))
    changed = plan_submission(stream).submission_id
    assert changed != first.submission_id
    (stream.parent / "notes.txt").write_text("x")
    assert plan_submission(stream).submission_id not in (first.submission_id, changed)


def test_inputs_outside_the_streams_folder_are_refused(tmp_path):
    stream = make_stream(tmp_path / "s", num_workers=1, fsdp=False, max_steps=2)
    spec = yaml.safe_load(stream.read_text())
    task = spec["tasks"][1]
    shutil.copy(stream.parent / task["train"], tmp_path / task["train"])
    task["train"] = f"../{task['train']}"  # still a valid stream: the file is there, one folder up
    stream.write_text(yaml.safe_dump(spec))
    with pytest.raises(SubmitError, match=rf"tasks\[{task['name']}\]\.train: {tmp_path}/"):
        plan_submission(stream)


# ---------------------------------------------------------------- a Ray Job on a local head


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _own_processes(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (this head's temp dir): the head's processes and its workers."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def ray_head():
    """A Ray head on loopback; yields (dashboard address, environment with its token)."""
    temp_dir = tempfile.mkdtemp(prefix="gorp-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, nm, om, client, agent, agent_grpc, metrics, rtenv = _free_ports(9)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this environment's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain on SIGTERM: stop at once
    }
    env.pop("RAY_ADDRESS", None)
    args = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
        "--temp-dir", temp_dir, "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--dashboard-port", str(dash), "--node-manager-port", str(nm),
        "--object-manager-port", str(om), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rtenv),
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, env["RAY_AUTH_TOKEN"], head, Path(log.name))
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in _own_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str, head: subprocess.Popen, log: Path) -> None:
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"the dashboard at {address} did not answer in 120 s:\n{log.read_text()[-3000:]}")


def _gorp_submit(stream: Path, address: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deploy.cli", "submit", str(stream), "--address", address, "--follow"]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_submit_runs_a_stream_once(ray_head, tmp_path):
    address, env = ray_head
    # two tasks: the job trains a sequence (the submission is what is tested; more stages would only cost time)
    stream = make_stream(tmp_path / "s", num_workers=1, fsdp=False, max_steps=2, tasks=["first", "second"])
    submission_id = plan_submission(stream).submission_id

    done = _gorp_submit(stream, address, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"submitted {submission_id}: python -m deploy.cli run stream.yaml" in done.stdout
    assert f"job {submission_id}: SUCCEEDED" in done.stdout
    results = json.loads((stream.parent / "run" / "results.json").read_text())  # written by the job, on this host
    assert len(results["matrix"]) == 2 and all(len(row) == 2 for row in results["matrix"])

    again = _gorp_submit(stream, address, env)
    assert again.returncode == 2, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"job {submission_id} is SUCCEEDED" in " ".join(again.stdout.split())
    assert f"submitted {submission_id}:" not in again.stdout

    from ray.job_submission import JobSubmissionClient

    token = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}  # this process never read the token from its env
    jobs = JobSubmissionClient(address, headers=token).list_jobs()
    assert [j.submission_id for j in jobs] == [submission_id]  # Ray holds one job: the second was never created
