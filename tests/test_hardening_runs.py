"""Hardening on the tiny stream with Ray (issue 10), each asserting the message and that nothing was trained twice
or lost:

- an unschedulable stream (4 one-CPU workers on a 2-CPU Ray) errors at once, naming the keys, recording nothing;
- a truncated tokenized-cache file is found and re-tokenized, with a warning;
- two ``gorp run`` of one stream started together on a fresh run directory: one trains, the other is refused naming
  the live run (host, pid); with the database there, ``--resume`` of the live sequence is refused; the live run
  killed, its lease left behind, ``--resume`` takes over and finishes: exactly T versions;
- Ctrl-C: the MLflow runs are KILLED, the message says where the run stands and how to resume, and ``--resume``
  finishes with exactly T versions and one run per stage;
- a worker group that cannot start (an attached cluster that never gets the workers) ends, once
  GORP_WAIT_FOR_WORKERS_S has passed, with one line of what Ray Train said, its whole text in the run's log;
- a failed start (a listener that breaks, a worker that dies at setup) leaves no run RUNNING and hides no complete
  sequence: a failed --restart is passed over, a failed continuation leaves the sequence FINISHED;
- a run whose lease is taken over mid-stage stops before the stage is registered, naming the new holder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from pipeline_fixtures import make_stream
from pipelines.lease import Lease
from pipelines.registry import tracking_uri_for
from pipelines.sequence import Callback
from pipelines.spec import load_stream

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num_workers": 1, "fsdp": False, "tasks": ["first", "second"]}
# `gorp run` with slow steps (the workers' hooks, as in test_recovery): the CLI itself, its messages and exit codes
DRIVER = """
import sys
import pipelines.run as run
from pipeline_fixtures import SlowSteps
real = run.run_stream
run.run_stream = lambda *a, **k: real(*a, **{**k, "hooks": SlowSteps(float(sys.argv[1]))})
from pipelines.cli import app
app(sys.argv[2:], prog_name="gorp")
"""


@pytest.fixture(scope="module")
def local_ray():
    env = {"env_vars": {"PYTHONPATH": str(ROOT / "tests")}}
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=env)
    yield
    ray.shutdown()


def test_unschedulable_stream_errors_at_once(local_ray, tmp_path):
    from pipelines.preflight import PreflightError
    from pipelines.run import run_stream

    stream = load_stream(make_stream(tmp_path, num_workers=4, fsdp=False, max_steps=4, tasks=["first"]))
    got: dict = {}

    def go():
        t = time.perf_counter()
        try:
            run_stream(stream)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            got["error"] = e
        got["s"] = time.perf_counter() - t

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive(), "the run is waiting for workers that cannot come"
    assert isinstance(got.get("error"), PreflightError), got
    text = str(got["error"])
    assert "scaling.num_workers 4 workers x (1 CPU) each" in text and "the Ray cluster has 2 CPU on 1 node(s)" in text
    assert "2 worker(s) fit" in text and "lower scaling.num_workers or scaling.cpus_per_worker" in text
    assert got["s"] < 30, f"{got['s']:.1f} s"
    print(f"unschedulable: {got['s']:.1f} s to the message")
    assert not (tmp_path / "run" / "mlflow.db").exists()  # nothing recorded
    assert not list((tmp_path / "run").glob("sequences/*/*/model"))


def test_truncated_cache_file_is_retokenized(local_ray, tmp_path, caplog):
    from pipelines.data import prepare_stream

    stream = load_stream(make_stream(tmp_path, **SMALL))
    run_dir = tmp_path / "run"
    first = prepare_stream(stream, tmp_path / "model", run_dir)
    files = sorted(run_dir.glob("cache/first.train.*/data/*.parquet"))
    assert len(files) == 1
    original = files[0].read_bytes()
    meta = json.loads((files[0].parents[1] / "meta.json").read_text())
    assert (
        meta["files"]
        == {
            f"data/{files[0].name}": {
                "bytes": len(original),
                "sha256": meta["files"][f"data/{files[0].name}"]["sha256"],
            }
        }
        and meta["num_rows"] == 32
    )
    files[0].write_bytes(original[: len(original) // 2])
    with caplog.at_level(logging.WARNING, logger="pipelines.data"):
        again = prepare_stream(stream, tmp_path / "model", run_dir)
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and "first.train." in damaged[0] and "does not match its size/sha256" in damaged[0]
    assert [p.split.cache_hit for p in again] == [False, True]  # only the damaged entry re-tokenized
    assert again[0].n_train == first[0].n_train == 32
    assert sorted(run_dir.glob("cache/first.train.*/data/*.parquet"))[0].read_bytes() == original
    third = prepare_stream(stream, tmp_path / "model", run_dir)
    assert [p.split.cache_hit for p in third] == [True, True]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def _gorp(step_sleep: float, *args: str, sigint_ignored: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(step_sleep), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a signal reaches the driver and the Ray it started
        # started the way a shell starts a background job: SIGINT ignored (Python keeps it so, unless gorp says not)
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def _versions(run_dir: Path) -> list:
    client = MlflowClient(tracking_uri_for(run_dir, None))
    return sorted(client.search_model_versions("name='tiny-stream'"), key=lambda v: int(v.version))


def _stage_running(run_dir: Path, stage: int) -> bool:
    path = run_dir / "progress.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return any(r["stage"] == stage for r in rows)


def _wait_for(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the driver ended first: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(what)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_two_runs_together_one_trains_the_other_is_refused(tmp_path):
    path = make_stream(tmp_path, max_steps=4, **SMALL)
    run_dir = tmp_path / "run"
    procs = [_gorp(0.5, "run", str(path)) for _ in range(2)]  # fresh: no database yet
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = _one_line(outs[loser])
    assert "a second run of a live sequence is refused: it is being run by gorp run tiny-stream" in refusal
    assert f"pid {procs[winner].pid}, since" in refusal and "Wait for it, or stop it" in refusal
    assert "Traceback" not in outs[loser]
    assert [v.tags["task"] for v in _versions(run_dir)] == ["first", "second"]

    # the database is there now: a third task appended (same configuration, so the same sequence: one new stage),
    # run slowly; --resume while it runs is refused
    path = make_stream(tmp_path, max_steps=4, num_workers=1, fsdp=False, tasks=["first", "second", "animal"])
    live = _gorp(20.0, "run", str(path))  # slow: killed once the second run has been refused
    try:
        _wait_for(lambda: _stage_running(run_dir, 2), live, 300, "stage 3 did not start")
        second = subprocess.run(
            [sys.executable, "-c", DRIVER, "0", "run", str(path), "--resume"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        refusal = _one_line(second.stdout)
        assert "--resume of a live sequence is refused" in refusal and f"pid {live.pid}, since" in refusal
        assert live.poll() is None  # the live run was left alone
    finally:
        os.killpg(live.pid, signal.SIGKILL)  # the owner dies: its lease stays behind
        live.wait()
    (lease_file,) = run_dir.glob("leases/*.json")
    holder = Lease.read(str(run_dir), lease_file.stem)
    assert holder.pid == live.pid and not holder.alive
    assert len(_versions(run_dir)) == 2
    resumed = _gorp(0.0, "run", str(path), "--resume")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming tiny-stream" in out
    assert [v.tags["task"] for v in _versions(run_dir)] == ["first", "second", "animal"]
    assert Lease.read(str(run_dir), lease_file.stem) is None  # released


def test_ctrl_c_marks_the_runs_killed_and_resume_finishes(tmp_path):
    path = make_stream(tmp_path, max_steps=8, **SMALL)
    run_dir = tmp_path / "run"
    proc = _gorp(1.0, "run", str(path), sigint_ignored=True)
    try:
        _wait_for(lambda: _stage_running(run_dir, 1), proc, 300, "stage 2 did not start")
        t = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        out = proc.communicate(timeout=120)[0]
        took = time.perf_counter() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    text = _one_line(out)
    assert "interrupted: stage 2/2 (second) was running; stage 1 is complete and registered" in text, out[-3000:]
    assert "marked KILLED. `gorp run --resume` continues from its last checkpoint" in text
    print(f"Ctrl-C: {took:.1f} s to the message")
    client = MlflowClient(tracking_uri_for(run_dir, None))
    exp = client.get_experiment_by_name("tiny-stream")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`gorp.kind` = 'sequence'")
    stages = {
        r.data.tags["gorp.stage"]: r.info.status
        for r in client.search_runs([exp.experiment_id], "tags.`gorp.kind` = 'stage'")
    }
    assert parent.info.status == "KILLED" and stages == {"0": "FINISHED", "1": "KILLED"}
    assert len(_versions(run_dir)) == 1
    assert not list(run_dir.glob("leases/*.json"))  # released on the way out
    stage1 = next(run_dir.glob("sequences/*/00-first/model/stage.json"))
    before = stage1.stat().st_mtime_ns

    resumed = _gorp(0.0, "run", str(path), "--resume")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert [v.tags["task"] for v in _versions(run_dir)] == ["first", "second"]
    (parent,) = client.search_runs([exp.experiment_id], "tags.`gorp.kind` = 'sequence'")
    runs = client.search_runs([exp.experiment_id], "tags.`gorp.kind` = 'stage'")
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.tags["gorp.stage"], r.info.status) for r in runs) == [("0", "FINISHED"), ("1", "FINISHED")]
    assert stage1.stat().st_mtime_ns == before  # stage 1 was not trained again


def _runs(run_dir: Path, kind: str) -> list:
    client = MlflowClient(tracking_uri_for(run_dir, None))
    exp = client.get_experiment_by_name("tiny-stream")
    runs = client.search_runs([exp.experiment_id], f"tags.`gorp.kind` = '{kind}'", order_by=["attributes.start_time"])
    return runs


def test_a_worker_group_that_cannot_start_ends_with_what_ray_train_said(local_ray, tmp_path, monkeypatch):
    """An attached cluster (RAY_ADDRESS) that never gets the workers: gorp says it waits, Ray Train waits for the
    worker group up to GORP_WAIT_FOR_WORKERS_S, and the run ends with one line of Ray Train's error; its whole text
    (and traceback) goes to the run's log."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # attached: it may grow, so it waits
    monkeypatch.setenv("GORP_WAIT_FOR_WORKERS_S", "4")
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)  # restored after the test
    path = make_stream(tmp_path, num_workers=4, fsdp=False, max_steps=4, tasks=["first"])
    got: dict = {}

    def go():
        t = time.perf_counter()
        got["out"] = CliRunner().invoke(app, ["run", str(path)])
        got["s"] = time.perf_counter() - t

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive(), "Ray Train retries the worker group's start forever"
    out = got["out"]
    assert out.exit_code == 1, out.output
    text = _one_line(out.output)
    assert (
        "waiting up to 4 s (GORP_WAIT_FOR_WORKERS_S) for 4 workers, which Ray Train asks the cluster's autoscaler "
        "for: scaling.num_workers 4 workers x (1 CPU) each" in text
    )
    assert (
        "error: stage 1/1 (first) failed: the worker group did not start. Ray Train: The worker group startup timed "
        "out after 4.0 seconds waiting for 4 workers (WorkerGroupStartupTimeoutError). It asked for "
        "scaling.num_workers 4 workers x (1 CPU) each (scaling.cpus_per_worker, scaling.use_gpu): lower them, or "
        "raise GORP_WAIT_FOR_WORKERS_S (now 4 s) for a cluster that scales up" in text
    ), out.output
    assert "Traceback" not in out.output and "Potential causes" not in out.output
    assert "then `gorp run` again (no stage had started)" in text and "--resume" not in text  # it would recur
    log = (tmp_path / "run" / "gorp.log").read_text()
    assert "Traceback" in log and "ControllerError" in log and "Potential causes include" in log  # Ray's whole text
    print(f"worker group never started: {got['s']:.1f} s to the message (GORP_WAIT_FOR_WORKERS_S=4): {text[-700:]}")
    assert [r.info.status for r in _runs(tmp_path / "run", "sequence")] == ["FAILED"]
    assert _versions(tmp_path / "run") == []


class _FailsAtStart(Callback):
    """A listener that breaks as the run starts (after the recorder opened the parent run)."""

    def on_start(self, plan):
        raise RuntimeError("listener broke at start")


def test_a_failed_start_hides_no_complete_sequence(local_ray, tmp_path):
    """A run that fails before it completes a stage leaves no run RUNNING and no parent that hides the complete
    sequence: a failed --restart is passed over by a plain run; a failed continuation (a worker that dies at setup)
    leaves the sequence FINISHED, and a plain run continues it. The worker's error is one line."""
    from pipelines.lineage import Lineage
    from pipelines.run import _plan, run_stream
    from pipelines.sequence import StageFailed, identity

    run_dir = tmp_path / "run"
    one = load_stream(make_stream(tmp_path, max_steps=4, **{**SMALL, "tasks": ["first"]}))
    done = run_stream(one)
    assert [s.task for s in done.stages] == ["first"]
    with pytest.raises(RuntimeError, match="listener broke at start"):
        run_stream(one, restart=True, callbacks=[_FailsAtStart()])
    assert [r.info.status for r in _runs(run_dir, "sequence")] == ["FINISHED", "FAILED"]  # not RUNNING
    again = run_stream(one)  # the failed restart is newer; the complete sequence is what a plain run finds
    assert again.sequence_id == done.sequence_id and [s.task for s in again.stages] == ["first"]

    class DiesAtSetup:
        def after_build(self, stage, model, method):
            raise RuntimeError(f"stage {stage + 1}: cannot build the model on this node")

        def after_step(self, stage, task, step, loss):
            return loss

    two = load_stream(make_stream(tmp_path, max_steps=4, **SMALL))  # "second" appended: continues the sequence
    t = time.perf_counter()
    with pytest.raises(StageFailed) as e:
        run_stream(two, hooks=DiesAtSetup())
    print(f"worker dies at setup: {time.perf_counter() - t:.1f} s to the message: {str(e.value).splitlines()[0]}")
    assert str(e.value).splitlines()[0] == (
        "stage 2/2 (second) failed: rank 0: RuntimeError: stage 2: cannot build the model on this node"
    )
    assert "Traceback" in "".join(__import__("traceback").format_exception(e.value))  # the log file's text
    parents, stages = _runs(run_dir, "sequence"), _runs(run_dir, "stage")
    assert [r.info.status for r in parents] == ["FINISHED", "FAILED"]
    assert [(r.data.tags["gorp.stage"], r.info.status) for r in stages] == [("0", "FINISHED"), ("1", "FAILED")]
    assert [v.tags["task"] for v in _versions(run_dir)] == ["first"]
    lin = Lineage(tracking_uri_for(run_dir, None), None)
    said: list[str] = []
    reopen, sequence_id, history, before = _plan(lin, two, identity(two), resume=False, restart=False, say=said.append)
    assert (reopen, sequence_id, before) == (parents[0].info.run_id, done.sequence_id, "FINISHED")
    assert [h.task for h in history] == ["first"] and said[0].startswith("continuing tiny-stream")


def test_a_run_that_loses_its_lease_stops_and_registers_nothing_more(local_ray, tmp_path):
    """The lease is taken over while stage 2 runs (its file names another holder): the run stops before the
    recorder sees stage 2, registers no version for it, leaves the lease file and the parent run to the new holder,
    and says who holds it now."""
    from dataclasses import asdict

    from pipelines.lease import Holder, LeaseLost
    from pipelines.run import run_stream

    run_dir = tmp_path / "run"
    stream = load_stream(make_stream(tmp_path, max_steps=4, **SMALL))
    now = time.time()
    thief = Holder("elsewhere", 4242, now, now, "gorp run tiny-stream --resume", 60.0, "f" * 32)

    stolen: list[float] = []

    class TakeOver(Callback):  # after the recorder: stage 1 is registered; at stage 2's last step, another takes over
        def on_progress(self, plan, stage, row):
            if stage == 1 and row["step"] == plan.steps[1]:
                stolen.append(time.perf_counter())
                (lease_file,) = run_dir.glob("leases/*.json")
                tmp = lease_file.with_suffix(".steal")
                tmp.write_text(json.dumps(asdict(thief)))
                os.replace(tmp, lease_file)

    with pytest.raises(LeaseLost) as e:
        run_stream(stream, callbacks=[TakeOver()])
    print(f"lease lost: {time.perf_counter() - stolen[0]:.1f} s from the takeover to the message: {e.value}")
    (lease_file,) = run_dir.glob("leases/*.json")
    assert str(e.value).startswith(
        f"tiny-stream: this run lost the sequence's lease ({lease_file}): taken over by gorp run tiny-stream "
        "--resume (host elsewhere, pid 4242, since "
    )
    assert str(e.value).endswith(
        "). It stopped at stage 2/2 (second) and records nothing more; the sequence is the new holder's"
    )
    assert e.value.holder == thief
    assert [v.tags["task"] for v in _versions(run_dir)] == ["first"]  # stage 2 was not registered
    assert json.loads(lease_file.read_text())["token"] == thief.token  # neither overwritten nor released
    (parent,) = _runs(run_dir, "sequence")
    stages = [(r.data.tags["gorp.stage"], r.info.status) for r in _runs(run_dir, "stage")]
    assert parent.info.status == "RUNNING" and stages == [("0", "FINISHED"), ("1", "KILLED")]
