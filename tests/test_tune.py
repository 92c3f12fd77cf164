"""gorp tune on the tiny stream: 6 trials over 3 stages with ASHA (grace 1 stage, reduction factor 2), two at a time
on a 2-CPU Ray; trials scored on validation (the first task's test labels are all wrong); the MLflow store; best.yaml;
the same trials under synchronous successive halving (paused at each stage boundary, resumed from their checkpoints);
a search whose driver is killed after 2 finished trials, resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline_fixtures import TASKS, make_stream
from pipelines.spec import load_stream
from tuning.lineage import PARENT_FILE, experiment_name, tracking_uri
from tuning.trial import SLOTS, STARTS

ROOT = Path(__file__).resolve().parents[1]
LRS = [0.05, 1e-4, 0.03, 1e-5, 0.02, 1e-6]  # three that learn a task in 12 steps, three that do not
SEARCH = """
space:
  lr: {grid: %s}
scheduler: {kind: %s, grace_period: 1, reduction_factor: 2}
num_samples: 1
seed: 0
"""


@pytest.fixture(scope="module")
def local_ray():
    from tuning.run import start_ray

    start_ray(num_cpus=2, env_vars={"PYTHONPATH": str(ROOT / "tests")})
    yield
    ray.shutdown()


def _wrong_test_labels(stream_yaml: Path, task: str) -> None:
    """Every answer of the task's test file replaced by the other option: a search scored on test would see 0."""
    path = stream_yaml.parent / f"{task}.test.jsonl"
    options, answer = TASKS[task][1], TASKS[task][2]
    wrong = next(o for o in options if o != answer)
    rows = [json.loads(line) | {"output": wrong} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


TRACKING_ENV: dict[str, str | None] = {}


@pytest.fixture(scope="module")
def search(local_ray, tmp_path_factory):
    from tuning.run import tune_stream

    root = tmp_path_factory.mktemp("tune")
    # 0.9 CPU a worker: two trials' worker groups and their drivers' slivers fit 2 CPUs at once
    stream_yaml = make_stream(root, num_workers=1, fsdp=False, scaling={"cpus_per_worker": 0.9})
    _wrong_test_labels(stream_yaml, "first")
    (root / "search.yaml").write_text(SEARCH % (LRS, "asha"))
    lines: list[str] = []
    TRACKING_ENV["before"] = os.environ.get("MLFLOW_TRACKING_URI")
    outcome = tune_stream(stream_yaml, root / "search.yaml", echo=lines.append)
    TRACKING_ENV["after"] = os.environ.get("MLFLOW_TRACKING_URI")
    return root, load_stream(stream_yaml), outcome, lines


def test_asha_stops_poor_trials_at_stage_boundaries(search):
    _, _, outcome, lines = search
    assert len(outcome.trials) == 6 and all(t["status"] == "TERMINATED" for t in outcome.trials)
    by_lr = {t["config"]["lr"]: t for t in outcome.trials}
    assert sorted(by_lr) == sorted(LRS)
    assert any(t["stopped"] and t["stages"] == 1 for t in outcome.trials)
    assert any(t["stages"] == 3 for t in outcome.trials)
    assert all(len(t["aa"]) == t["stages"] for t in outcome.trials)  # one report per completed stage
    spent = sum(t["stages"] for t in outcome.trials)
    assert spent < 18 and f"stage-trainings spent: {spent} (running every trial to the end: 18)" in lines
    # the learners beat the non-learners at stage 1, which is what ASHA cut on
    assert min(by_lr[lr]["aa"][0] for lr in (0.05, 0.03, 0.02)) > max(by_lr[lr]["aa"][0] for lr in (1e-5, 1e-6))


def test_trials_are_scored_on_validation_not_test(search):
    _, _, outcome, lines = search
    # "first"'s test labels are all wrong; its held-out training rows are right: a learner scores 1.0 on them
    assert outcome.best is not None and outcome.best["config"]["lr"] in (0.05, 0.03, 0.02)
    assert outcome.best["aa"][0] == 1.0
    assert any(line.startswith("first: no validation split; 6 of 32 training rows held out") for line in lines)


def test_two_trials_ran_at_once_on_two_cpus(search):
    root, stream, outcome, _ = search
    starts = dict(line.split() for line in (root / "run" / "tune" / "search" / STARTS).read_text().splitlines())
    spans = [(float(starts[t["trial_id"]]), t["ended"]) for t in outcome.trials]
    overlap = any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i + 1 :])
    assert overlap, spans


def test_a_search_leaves_the_processes_tracking_uri_as_it_was(search):
    # Ray's MLflow callback sets MLFLOW_TRACKING_URI: a later run in this process would record into the search's store
    assert TRACKING_ENV["after"] == TRACKING_ENV["before"]


def test_mlflow_has_one_search_run_with_six_nested_trials(search):
    _, stream, outcome, _ = search
    client = MlflowClient(tracking_uri(stream))
    exp = client.get_experiment_by_name(experiment_name(stream))
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [outcome.parent_run_id]
    assert (
        parents[0].info.status == "FINISHED" and parents[0].data.metrics["best_objective"] == outcome.best["objective"]
    )
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(nested) == 6
    for run in nested:
        trial = next(t for t in outcome.trials if run.data.tags["trial_name"].endswith(t["trial_id"]))
        history = client.get_metric_history(run.info.run_id, "aa")
        assert [m.step for m in history] == list(range(1, trial["stages"] + 1))
        assert [m.value for m in history] == pytest.approx(trial["aa"])
        assert run.data.tags["gorp.stopped_at_stage"] == (str(trial["stages"]) if trial["stopped"] else "-")
    assert not client.search_registered_models()  # a search registers no model versions


def test_best_yaml_is_a_stream_with_the_best_trials_values(search):
    root, stream, outcome, _ = search
    out = root / "run" / "tune" / "search"
    best = load_stream(out / "best.yaml")
    complete = [t for t in outcome.trials if t["stages"] == 3]
    assert outcome.best["objective"] == max(t["objective"] for t in complete)
    assert best.method_args == stream.method_args | {"lr": outcome.best["config"]["lr"]}
    assert [t.test for t in best.tasks] == [t.test for t in stream.tasks]  # `gorp run best.yaml` reports test
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert sorted(float(r["lr"]) for r in rows) == sorted(LRS)
    assert (out / "aa_per_stage.png").stat().st_size > 5000


@pytest.fixture(scope="module")
def halving(local_ray, tmp_path_factory):
    from tuning.run import tune_stream

    root = tmp_path_factory.mktemp("halving")
    stream_yaml = make_stream(root, num_workers=1, fsdp=False, scaling={"cpus_per_worker": 0.9})
    (root / "search.yaml").write_text(SEARCH % (LRS[:4], "halving"))  # two learners, two not
    lines: list[str] = []
    outcome = tune_stream(stream_yaml, root / "search.yaml", echo=lines.append)
    return root, load_stream(stream_yaml), outcome, lines


def test_halving_waits_at_each_stage_boundary_and_keeps_the_best_half(halving):
    root, stream, outcome, lines = halving
    by_lr = {t["config"]["lr"]: t for t in outcome.trials}
    assert all(t["status"] == "TERMINATED" for t in outcome.trials)
    # 4 -> 2 -> 1: the two learners pass stage 1; 4 + 2 + 1 = 7 stage-trainings, each reported once
    assert sorted(t["stages"] for t in outcome.trials) == [1, 1, 2, 3]
    assert {lr for lr, t in by_lr.items() if t["stages"] > 1} == {0.05, 0.03}
    assert "stage-trainings spent: 7 (running every trial to the end: 12)" in lines
    client = MlflowClient(tracking_uri(stream))
    exp = client.get_experiment_by_name(experiment_name(stream))
    nested = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    histories = [client.get_metric_history(r.info.run_id, "aa") for r in nested]
    assert sorted(len(h) for h in histories) == [1, 1, 2, 3]  # a resumed trial reports no stage twice
    assert all([m.step for m in h] == list(range(1, len(h) + 1)) for h in histories)
    # synchronous: no trial trained stage k + 1 before every trial still in the search had finished stage k
    ended = {k: [m.timestamp for h in histories for m in h if m.step == k] for k in (1, 2, 3)}
    assert max(ended[1]) <= min(ended[2]) and max(ended[2]) <= min(ended[3])
    # the trials that went on were paused at the boundary and started again (a line per start)
    starts = [line.split()[0] for line in (root / "run" / "tune" / "search" / STARTS).read_text().splitlines()]
    assert len(starts) > 4 and set(starts) == {t["trial_id"] for t in outcome.trials}
    # all 4 trials exist from the start; the slots let 2 worker groups run at once (what 2 CPUs hold), never more
    held, most = 0, 0
    events = [line.split() for line in (root / "run" / "tune" / "search" / SLOTS).read_text().splitlines()]
    for _, event, _ in sorted(events, key=lambda e: float(e[2])):
        held += 1 if event == "take" else -1
        most = max(most, held)
    assert most == 2 and held == 0 and len(events) == 2 * 7  # a take and a give per stage-training here


def test_killed_search_resumes_without_rerunning_finished_trials(tmp_path):
    stream_yaml = make_stream(tmp_path, num_workers=1, fsdp=False, max_steps=4, tasks=["first"])
    (tmp_path / "search.yaml").write_text(SEARCH % ([0.05, 0.03, 0.02], "random") + "concurrency: 1\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "tune",
        str(stream_yaml),
        str(tmp_path / "search.yaml"),
        "--out",
        str(out),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:  # one at a time: the third trial's start means two have finished
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / STARTS).is_file() and len((out / STARTS).read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the search ended before it could be killed"
        time.sleep(3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = [line.split()[0] for line in (out / STARTS).read_text().splitlines()]
    done = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    starts = [line.split()[0] for line in (out / STARTS).read_text().splitlines()]
    assert starts[: len(first)] == first
    assert sorted(starts[len(first) :]) == sorted(set(first[2:])), (first, starts)  # only the unfinished trial again
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 3 and all(r["stages"] == "1" for r in rows)
    # one nested run per trial: the restarted trial kept the run it had before the kill, now finished
    stream = load_stream(stream_yaml)
    client = MlflowClient(tracking_uri(stream))
    exp = client.get_experiment_by_name(experiment_name(stream))
    parent = json.loads((out / PARENT_FILE).read_text())["run_id"]  # the store also holds the module's search
    nested = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId") == parent]
    names = [r.data.tags["trial_name"] for r in nested]
    assert len(names) == 3 and all(any(n.endswith(f"_{t}") for n in names) for t in set(first)), (names, first)
    assert {r.info.status for r in nested} == {"FINISHED"}
