"""The continual pipeline end to end on Ray: a three-task tiny stream, two workers, FSDP2, MLflow lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from gorp.metrics import summarize
from pipeline_fixtures import make_stream
from pipelines.run import run_stream
from pipelines.spec import load_stream

NAMES = ["part_of_speech", "hypernym", "domain"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def stage_records(run_dir: Path) -> list[dict]:
    seq = next((run_dir / "sequences").iterdir())
    return [json.loads((d / "model" / "stage.json").read_text()) for d in sorted(seq.iterdir())]


@pytest.fixture(scope="module")
def two_workers(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    stream = load_stream(make_stream(root, num_workers=2, fsdp=True, max_steps=6))
    results = run_stream(stream)
    return root, stream, results


def test_three_tasks_two_workers_fsdp2(two_workers):
    root, stream, results = two_workers
    run_dir = root / "run"
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == results
    assert list(results) == ["tasks", "matrix", "zero_shot", "aa", "bwt", "fwt", "forgetting", "stages"]
    assert results["tasks"] == NAMES
    m = results["matrix"]
    assert len(m) == 3 and all(len(row) == 3 for row in m)
    assert m[0][2] is None and all(m[t][i] is not None for t in range(3) for i in range(min(t + 2, 3)))
    assert all(0.0 <= v <= 1.0 for row in m for v in row if v is not None)
    expected = summarize(m, results["zero_shot"])
    for k in ("aa", "bwt", "fwt", "forgetting"):
        assert results[k] == pytest.approx(expected[k])
    assert [s["task"] for s in results["stages"]] == NAMES
    assert all(s["train_s"] > 0 and s["tokens_per_s"] > 0 for s in results["stages"])
    for png in ("heatmap.png", "forgetting.png"):
        assert (run_dir / png).stat().st_size > 1000
    # the stage models: plain HF folders with merged weights that moved from the base model
    records = stage_records(run_dir)
    assert [r["world_size"] for r in records] == [2, 2, 2]
    base = load_file(str(root / "model" / "model.safetensors"))
    seq = next((run_dir / "sequences").iterdir())
    prev = base
    for d in sorted(seq.iterdir()):
        weights = load_file(str(d / "model" / "model.safetensors"))
        assert set(weights) == set(base)  # adapters merged: the base model's keys, nothing else
        assert (d / "model" / "method_state.safetensors").exists() and (d / "model" / "tokenizer.json").exists()
        gate = "model.layers.0.mlp.gate_proj.weight"
        assert not torch.equal(weights[gate], prev[gate])  # GORP trains gate_proj full rank
        prev = weights


def test_one_worker_gives_the_same_first_stage_loss_curve(two_workers, tmp_path):
    """Same seed, same data: every worker reads the same global batches, so the curve does not depend on the number
    of workers beyond float rounding (sharded reductions sum in another order): tolerance 1e-4 relative."""
    root, _, _ = two_workers
    stream = load_stream(make_stream(tmp_path, num_workers=1, fsdp=False, max_steps=6))
    run_stream(stream)
    one = stage_records(tmp_path / "run")[0]["losses"]
    two = stage_records(root / "run")[0]["losses"]
    assert len(one) == len(two) == 6
    torch.testing.assert_close(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5)


def test_registry_and_lineage_after_three_stages(two_workers):
    from mlflow import MlflowClient

    from pipelines.lineage import lineage_report, tracking_uri_for

    root, stream, results = two_workers
    uri = tracking_uri_for(root / "run", None)
    client = MlflowClient(uri)
    versions = sorted(client.search_model_versions(f"name='{stream.name}'"), key=lambda v: int(v.version))
    assert [v.tags["task"] for v in versions] == NAMES
    assert [v.tags["parent_version"] for v in versions] == ["", "1", "2"]
    assert all(v.tags["method"] == "gorp" and len(v.tags["data_digest"]) == 64 for v in versions)
    report = lineage_report(stream.name, uri)
    assert [v["version"] for v in report["versions"]] == [1, 2, 3]
    assert report["tasks"] == NAMES
    for got, want in zip(report["matrix"], results["matrix"], strict=True):
        assert [None if v is None else round(v, 6) for v in got] == [None if v is None else round(v, 6) for v in want]
