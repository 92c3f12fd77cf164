"""Lineage and recovery: the registry after a run, loading versions back, a killed driver, a killed worker, a NaN
stage, and bad input that must fail before anything is trained or recorded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline_fixtures import NAMES, SlowSteps, make_stream
from pipelines.registry import lineage_report, load_version, tracking_uri_for
from pipelines.results import StageResult
from pipelines.run import run_stream
from pipelines.sequence import StageFailed
from pipelines.spec import load_stream

ROOT = Path(__file__).resolve().parents[1]
STREAM = {"num_workers": 1, "fsdp": False, "max_steps": 12, "training": {"checkpoint_every": 2, "max_failures": 1}}


def versions_of(run_dir: Path, name: str = "tiny-stream") -> list:
    client = MlflowClient(tracking_uri_for(run_dir, None))
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def local_ray():
    env = {"env_vars": {"PYTHONPATH": str(ROOT / "tests")}}  # the workers import pipeline_fixtures' hooks
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=env)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    stream = load_stream(make_stream(root, **STREAM))
    return root, stream, run_stream(stream)


def test_registry_chain_aliases_and_lineage_json(reference):
    from pipelines.cli import app

    root, stream, result = reference
    run_dir = root / "run"
    uri = tracking_uri_for(run_dir, None)
    client = MlflowClient(uri)
    versions = versions_of(run_dir)
    assert [int(v.version) for v in versions] == [1, 2, 3]
    assert [v.tags["stage"] for v in versions] == ["0", "1", "2"]
    assert [v.tags["task"] for v in versions] == NAMES
    assert [v.tags["parent_version"] for v in versions] == ["", "1", "2"]
    for v in versions:
        assert {"method", "data_digest", "config_hash", "aa", "bwt"} <= set(v.tags)
        run = client.get_run(v.run_id)
        parent = run.data.tags["mlflow.parentRunId"]
        assert client.get_run(parent).data.tags["gorp.kind"] == "sequence"
        assert run.info.status == "FINISHED"
        assert run.inputs.dataset_inputs, "data sources and digests are recorded"
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} >= {v.tags["data_digest"][:36]} or any(
            v.tags["data_digest"].startswith(d.dataset.digest) for d in run.inputs.dataset_inputs
        )
    champion = client.get_model_version_by_alias("tiny-stream", "champion")
    assert champion.tags["promoted"] == "true" and int(champion.version) == 1  # 2 and 3 forget "first": refused
    out = CliRunner().invoke(app, ["lineage", "tiny-stream", "--tracking-uri", uri, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report == json.loads(json.dumps(lineage_report("tiny-stream", uri)))
    assert [v["version"] for v in report["versions"]] == [1, 2, 3]
    assert [v["task"] for v in report["versions"]] == NAMES


def test_versions_loaded_back_reproduce_their_recorded_accuracy(reference):
    from gorp.models import load_model
    from pipelines.data import prepare_stream
    from pipelines.worker import _evaluate

    root, stream, result = reference
    run_dir = root / "run"
    uri = tracking_uri_for(run_dir, None)
    prepared = prepare_stream(stream, root / "model", run_dir)
    eval_sets = {p.name: p.eval_set for p in prepared}
    assert max(max(v for v in row if v is not None) for row in result.matrix) >= 0.9  # not a matrix of zeros
    for t, ref in enumerate(["models:/tiny-stream/1", "models:/tiny-stream/2", "models:/tiny-stream/3"]):
        model, tok = load_model(load_version(ref, uri))
        seen = NAMES[: t + 1]
        got, answers = _evaluate(model, tok, eval_sets, seen, 8)
        assert [got[n] for n in seen] == result.matrix[t][: t + 1]
        assert answers == {n: result.stages[t].answers[n] for n in seen}  # what it answered, too


def test_second_run_on_a_complete_sequence_does_nothing(reference):
    root, stream, result = reference
    t = time.perf_counter()
    again = run_stream(stream)
    assert again.matrix == result.matrix and [s.model_uri for s in again.stages] == [s.model_uri for s in result.stages]
    assert len(versions_of(root / "run")) == 3
    assert time.perf_counter() - t < 30  # no stage ran (no worker group was started)


def _driver(yaml_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*_driver_cmd(yaml_path), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL takes the driver and the Ray it started
    )


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def _checkpointed(run_dir: Path, stage: int) -> int:
    """The step of the latest checkpoint Ray Train has committed for ``stage`` (0: none yet)."""
    snaps = list((run_dir / "ray").glob("*/checkpoint_manager_snapshot.json")) if (run_dir / "ray").exists() else []
    try:
        latest = json.loads(snaps[0].read_text())["latest_checkpoint_result"]["metrics"] if snaps else {}
    except (ValueError, KeyError, TypeError):  # being written
        return 0
    return int(latest.get("step", 0)) if latest.get("stage") == stage else 0


def _progress(run_dir: Path, stage: int) -> int:
    """The last step of ``stage`` the driver has seen (``progress.jsonl``, written as the steps arrive)."""
    path = run_dir / "progress.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return max((r["step"] for r in rows if r["stage"] == stage), default=0)


def _stage_models(root: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(p)) for p in sorted((root / "run").glob("sequences/*/*/model/model.safetensors"))]


def assert_resumed_exactly(ref: list[StageResult], got: list[StageResult], ref_root: Path, root: Path) -> None:
    """The resumed stage's losses equal the reference's from the resume point on, and every stage's weights equal
    the reference's tensor by tensor, bitwise: the same ops in the same order on the same CPU threads, from a
    checkpoint that restores the model and the optimizer state exactly."""
    assert [s.row for s in got] == [s.row for s in ref]
    for r, g in zip(ref, got, strict=True):
        assert g.losses == r.losses[g.resumed_from :], f"stage {g.stage + 1}: losses differ after the resume"
    for r, g in zip(_stage_models(ref_root), _stage_models(root), strict=True):
        assert r.keys() == g.keys() and all(torch.equal(r[k], g[k]) for k in r)


def test_killed_driver_resumes_exactly(reference, tmp_path):
    ref_root, _, ref_result = reference
    path = make_stream(tmp_path, **STREAM)
    run_dir = tmp_path / "run"
    proc = _driver(path, "--step-sleep", "0.5")
    try:  # kill once stage 2 has a committed checkpoint and has trained past it
        _wait_for(
            lambda: (
                (_checkpointed(run_dir, 1) and _progress(run_dir, 1) > _checkpointed(run_dir, 1))
                or proc.poll() is not None
            ),
            300,
            "stage 2 did not get past its first checkpoint",
        )
        committed = _checkpointed(run_dir, 1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own: the asserts below say how
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed in (2, 4, 6, 8, 10)
    assert len(versions_of(run_dir)) == 1  # stage 1 recorded, stage 2 interrupted
    out = subprocess.run([*_driver_cmd(path), "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" in out.stdout
    stages = [StageResult.load(str(p.parent)) for p in sorted(run_dir.glob("sequences/*/*/model/stage.json"))]
    assert stages[1].resumed_from >= committed  # from the last checkpoint committed before the kill
    assert_resumed_exactly(ref_result.stages, stages, ref_root, tmp_path)
    assert [int(v.version) for v in versions_of(run_dir)] == [1, 2, 3]
    # the parent run continued: one sequence run, one FINISHED child run per stage
    client = MlflowClient(tracking_uri_for(run_dir, None))
    exp = client.get_experiment_by_name("tiny-stream")
    seqs = client.search_runs([exp.experiment_id], "tags.`gorp.kind` = 'sequence'")
    stage_runs = client.search_runs([exp.experiment_id], "tags.`gorp.kind` = 'stage'")
    assert len(seqs) == 1 and seqs[0].info.status == "FINISHED"
    assert sorted(r.data.tags["gorp.stage"] for r in stage_runs) == ["0", "1", "2"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def _driver_cmd(path: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "driver_main.py"), str(path)]


def test_killed_worker_restarts_from_the_last_checkpoint_exactly(reference, tmp_path):
    from ray.util.state import list_actors

    ref_root, _, ref_result = reference
    stream = load_stream(make_stream(tmp_path, **STREAM))
    run_dir = tmp_path / "run"
    killed: dict = {}

    def killer():
        _wait_for(
            lambda: _checkpointed(run_dir, 1) and _progress(run_dir, 1) > _checkpointed(run_dir, 1),
            300,
            "stage 2 did not get past its first checkpoint",
        )
        killed["committed"] = _checkpointed(run_dir, 1)
        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=alive)  # this test's Ray
        killed["at_step"] = _progress(run_dir, 1)
        os.kill(int(actors[0].pid), signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_stream(stream, hooks=SlowSteps(0.5))
    thread.join(timeout=5)
    assert "at_step" in killed
    stage2 = result.stages[1]
    assert stage2.resumed_from >= killed["committed"] > 0
    redone = killed["at_step"] - stage2.resumed_from
    print(f"worker killed at step {killed['at_step']}, resumed from step {stage2.resumed_from}: {redone} redone")
    assert 0 <= redone <= 2
    assert_resumed_exactly(ref_result.stages, result.stages, ref_root, tmp_path)
    assert len(versions_of(run_dir)) == 3


def test_nan_loss_fails_the_stage_and_leaves_the_registry_alone(local_ray, tmp_path):
    from gorp.models import load_model

    stream = load_stream(make_stream(tmp_path, **{**STREAM, "training": {"max_failures": 0}}))
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match=r"(?s)stage 2/3 \(second\) failed.*loss is not finite at step 2"):
        run_stream(stream, hooks=SlowSteps(nan_at=("second", 1)))
    uri = tracking_uri_for(run_dir, None)
    client = MlflowClient(uri)
    assert [v.tags["task"] for v in versions_of(run_dir)] == ["first"]
    assert int(client.get_model_version_by_alias("tiny-stream", "champion").version) == 1
    exp = client.get_experiment_by_name("tiny-stream")
    failed = client.search_runs([exp.experiment_id], "tags.`gorp.stage` = '1'")
    assert failed[0].info.status == "FAILED" and "not finite" in failed[0].data.tags["gorp.error"]
    model, _ = load_model(load_version("models:/tiny-stream@champion", uri))  # the previous champion still loads
    assert model.num_parameters() > 0


BAD_INPUTS = {
    "invalid_json": (lambda p: p.write_text(p.read_text() + "{not json\n"), "invalid JSON"),
    "missing_field": (
        lambda p: p.write_text(p.read_text() + json.dumps({"instruction": "x", "input": "y"}) + "\n"),
        "output",
    ),
    "empty_output": (
        lambda p: p.write_text(p.read_text() + json.dumps({"instruction": "x", "input": "y", "output": ""}) + "\n"),
        "empty",
    ),
    "label_not_in_options": (
        lambda p: p.write_text(
            p.read_text() + json.dumps({"instruction": "x", "input": "y", "output": "green"}) + "\n"
        ),
        "not among the options",
    ),
    "wrong_type": (
        lambda p: p.write_text(p.read_text() + json.dumps({"instruction": "x", "input": 3, "output": "red"}) + "\n"),
        "string",
    ),
    "non_utf8": (
        lambda p: p.write_bytes(p.read_bytes() + b'{"instruction": "\xff\xfe", "input": "", "output": "red"}\n'),
        "UTF-8",
    ),
    "empty_file": (lambda p: p.write_text(""), "empty"),
    "huge_line": (
        lambda p: p.write_text(
            p.read_text() + json.dumps({"instruction": "x" * 2_000_000, "input": "", "output": "red"}) + "\n"
        ),
        "bytes|too long|limit",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_record_fails_before_training_and_records_nothing(local_ray, tmp_path, kind):
    from pipelines.data import DataError

    corrupt, match = BAD_INPUTS[kind]
    path = make_stream(tmp_path, **STREAM)
    data = tmp_path / "first.train.jsonl"
    corrupt(data)
    with pytest.raises(DataError, match=match) as err:
        run_stream(load_stream(path))
    if kind not in ("empty_file",):
        assert f"{data.name}:" in str(err.value)  # names the file (and line)
    run_dir = tmp_path / "run"
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "sequences").exists()


def test_stream_level_bad_input_fails_before_training(local_ray, tmp_path):
    import yaml

    from pipelines.data import DataError
    from pipelines.spec import SpecError

    path = make_stream(tmp_path, **STREAM)
    spec = yaml.safe_load(path.read_text())
    dup = {**spec, "tasks": spec["tasks"] + [spec["tasks"][0]]}
    path.write_text(yaml.safe_dump(dup))
    with pytest.raises(SpecError, match="duplicate task name 'first'"):
        load_stream(path)
    missing = {**spec, "tasks": [{**spec["tasks"][0], "train": "nowhere.jsonl"}]}
    path.write_text(yaml.safe_dump(missing))
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        run_stream(load_stream(path))
    assert not (tmp_path / "run" / "mlflow.db").exists()
