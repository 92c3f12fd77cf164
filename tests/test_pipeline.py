"""The continual pipeline end to end on Ray: the tiny stream that learns, two workers with FSDP2, one worker through
the library call, MLflow lineage, and the two carry-overs GORP's released code got wrong, checked through the
pipeline (each check is also shown to fail on a deliberately broken carry-over)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from gorp.metrics import summarize
from pipeline_fixtures import NAMES, make_stream
from pipelines.results import StageResult
from pipelines.run import run_stream
from pipelines.sequence import Callback, run_sequence
from pipelines.spec import load_stream
from pipelines.worker import weights_digest

GATE = "model.layers.0.mlp.gate_proj.weight"


class Collect(Callback):
    """Every event, in order."""

    def __init__(self):
        self.events: list[tuple] = []
        self.results: list[StageResult] = []

    def on_stage_start(self, plan, stage):
        self.events.append(("start", stage))

    def on_progress(self, plan, stage, row):
        self.events.append(("progress", stage, row["step"]))

    def on_stage_end(self, plan, result):
        self.events.append(("end", result.stage))
        self.results.append(result)


class BreakCarryOver:
    """Worker hooks that break one carry-over each (the released code's two defects): stage 2 starts with a fresh
    method (no task memory), stage 3 from the base model's weights."""

    def __init__(self, base: str):
        self.base = base

    def after_build(self, stage, model, method):
        from gorp.methods import build_method
        from gorp.models import load_model

        if stage == 1:
            return model, build_method(method.name, **method.args.__dict__)
        if stage == 2:
            return load_model(self.base)[0], method
        return model, method

    def after_step(self, stage, task, step, loss):
        return loss


@pytest.fixture(scope="module")
def local_ray():
    # the workers import this module by name to run BreakCarryOver's hooks
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        runtime_env=env,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    stream = load_stream(make_stream(root, num_workers=2, fsdp=True))
    collect = Collect()
    result = run_stream(stream, callbacks=[collect])
    return root, stream, result, collect


@pytest.fixture(scope="module")
def one_worker(local_ray, tmp_path_factory):
    """The library call alone: one worker, no recorders."""
    root = tmp_path_factory.mktemp("one")
    stream = load_stream(make_stream(root, num_workers=1, fsdp=False))
    collect = Collect()
    return root, run_sequence(stream, callbacks=[collect]), collect


def test_stages_come_back_in_order_with_the_matrix_gorp_run_writes(two_workers):
    root, stream, result, collect = two_workers
    on_disk = json.loads((root / "run" / "results.json").read_text())
    assert [r.stage for r in collect.results] == [0, 1, 2] and [r.task for r in collect.results] == NAMES
    assert [[r.row.get(n) for n in NAMES] for r in collect.results] == on_disk["matrix"] == result.matrix
    ends = [e for e in collect.events if e[0] != "progress"]
    assert ends == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    steps = [e[2] for e in collect.events if e[0] == "progress" and e[1] == 1]
    assert steps == list(range(1, 13))  # every step of stage 2 reached the driver, in order
    assert on_disk["tasks"] == NAMES and on_disk["zero_shot"] == result.zero_shot
    for k in ("aa", "bwt", "fwt", "forgetting"):
        assert on_disk[k] == pytest.approx(summarize(result.matrix, result.zero_shot)[k])


def test_the_tiny_stream_learns_each_task_and_forgets_visibly(two_workers):
    _, _, result, _ = two_workers
    m, base = result.matrix, result.zero_shot
    assert base == [0.0, 0.0, 0.0]
    assert all(m[t][t] >= 0.9 for t in range(3)), m  # each task learned right after its stage
    assert m[1][0] <= 0.1, m  # "second" overwrites "first"'s answer: forgetting shows in the matrix
    assert result.summary["forgetting"] >= 0.4 and result.summary["bwt"] <= -0.4


def test_two_workers_shard_and_save_plain_merged_models(two_workers):
    root, _, result, _ = two_workers
    assert [s.world_size for s in result.stages] == [2, 2, 2]
    base = load_file(str(root / "model" / "model.safetensors"))
    prev = base
    for s in result.stages:
        folder = Path(s.model_uri)
        assert folder.is_relative_to(root / "run" / "sequences")
        weights = load_file(str(folder / "model.safetensors"))
        assert set(weights) == set(base)  # adapters merged: the base model's keys, nothing else
        assert (folder / "method_state.safetensors").exists() and (folder / "tokenizer.json").exists()
        assert StageResult.load(s.model_uri) == s  # stage.json beside the model holds the same result
        assert not torch.equal(weights[GATE], prev[GATE])  # GORP trains gate_proj full rank
        prev = weights


def test_library_call_records_nothing_and_matches_the_loss_curve_of_two_workers(one_worker, two_workers):
    root, result, collect = one_worker
    assert not (root / "run" / "mlflow.db").exists() and not list(root.glob("**/mlflow.db"))
    assert [r.task for r in result.stages] == NAMES and result.complete
    assert [r.stage for r in collect.results] == [0, 1, 2]
    # same seed, same data: every worker reads the same global batches, so the curve does not depend on the number
    # of workers beyond float rounding (sharded reductions sum in another order): tolerance 1e-4 relative
    one, two = result.stages[0].losses, two_workers[2].stages[0].losses
    assert len(one) == len(two) == 12
    torch.testing.assert_close(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5)
    # the share of the gradient the task memory removed: nothing in the first stage, some later, and the same over
    # two row-sharded workers as over one (the energies are summed over the shards)
    stats = [s.method_stats for s in result.stages]
    assert stats[0]["memory_removed_full_rank"] == stats[0]["memory_removed_lora_a"] == 0.0
    assert all(0 < x[k] < 1 for x in stats[1:] for k in ("memory_removed_full_rank", "memory_removed_lora_a"))
    for a, b in zip(stats, (s.method_stats for s in two_workers[2].stages), strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6)


def carry_over_checks(stages: list[StageResult]) -> list[str]:
    """What is wrong with the carry-over between consecutive stages (empty: both defects are absent)."""
    problems = []
    for prev, cur in zip(stages, stages[1:], strict=False):
        folder = Path(prev.model_uri)
        saved = load_file(str(folder / "model.safetensors"))
        memory = load_file(str(folder / "method_state.safetensors"))
        if cur.start["weights_digest"] != weights_digest(saved):
            problems.append(f"stage {cur.stage + 1} did not start from stage {prev.stage + 1}'s merged weights")
        if cur.start["memory"] != {k: list(v.shape) for k, v in memory.items()} or not memory:
            problems.append(f"stage {cur.stage + 1} did not start with stage {prev.stage + 1}'s task memory")
        basis = memory.get(f"memory/{GATE}")
        delta = load_file(str(Path(cur.model_uri) / "model.safetensors"))[GATE] - saved[GATE]
        inside = (basis.T @ delta).norm() if basis.shape[0] == delta.shape[0] else (delta @ basis).norm()
        if inside > 1e-4 * delta.norm():
            problems.append(
                f"stage {cur.stage + 1}'s gate_proj update has {inside / delta.norm():.2e} of its norm "
                f"inside stage {prev.stage + 1}'s stored subspace"
            )
    return problems


def test_each_stage_starts_from_the_last_ones_weights_and_memory_and_stays_off_its_subspace(one_worker):
    _, result, _ = one_worker
    assert carry_over_checks(result.stages) == []
    memory = load_file(str(Path(result.stages[0].model_uri) / "method_state.safetensors"))
    assert memory[f"memory/{GATE}"].shape[1] > 0  # the first task stored directions to protect


def test_the_carry_over_checks_catch_a_broken_carry_over(local_ray, tmp_path):
    stream = load_stream(make_stream(tmp_path, num_workers=1, fsdp=False))
    result = run_sequence(stream, hooks=BreakCarryOver(str(tmp_path / "model")))
    problems = carry_over_checks(result.stages)
    assert "stage 2 did not start with stage 1's task memory" in problems, problems
    assert any(p.startswith("stage 2's gate_proj update") for p in problems), problems
    assert "stage 3 did not start from stage 2's merged weights" in problems, problems
    assert "stage 2 did not start from stage 1's merged weights" not in problems, problems


def test_registry_and_lineage_after_three_stages(two_workers):
    from mlflow import MlflowClient

    from pipelines.registry import lineage_report, tracking_uri_for

    root, stream, result, _ = two_workers
    uri = tracking_uri_for(root / "run", None)
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions(f"name='{stream.name}'"), key=lambda v: int(v.version))
    assert [v.tags["task"] for v in versions] == NAMES
    assert [v.tags["parent_version"] for v in versions] == ["", "1", "2"]
    assert [v.source for v in versions] == [s.model_uri for s in result.stages]
    assert all(v.tags["method"] == "gorp" and len(v.tags["data_digest"]) == 64 for v in versions)
    report = lineage_report(stream.name, uri)
    assert [v["version"] for v in report["versions"]] == [1, 2, 3]
    assert report["tasks"] == NAMES
    for got, want in zip(report["matrix"], result.matrix, strict=True):
        assert [None if v is None else round(v, 6) for v in got] == [None if v is None else round(v, 6) for v in want]
