"""Continuing a sequence: a stream with a task appended trains exactly one new stage on top of the completed
sequence; ``start_from`` starts a new sequence from a registered version's model and method state; a stream whose
earlier tasks changed is refused. One worker, in bf16 with activation checkpointing (the one-worker autocast path of
``training.precision``); what is checked is which stages run and from what."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient
from rich.console import Console
from safetensors.torch import load_file

from pipeline_fixtures import NAMES, make_stream
from pipelines.registry import tracking_uri_for
from pipelines.run import run_stream
from pipelines.spec import load_stream
from pipelines.worker import weights_digest

STREAM = {"num_workers": 1, "fsdp": False, "training": {"precision": "bf16", "activation_checkpointing": True}}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def _run(path: Path, **kwargs):
    out = io.StringIO()
    result = run_stream(load_stream(path), console=Console(file=out, width=1000), **kwargs)
    return result, out.getvalue()


def _versions(run_dir: Path) -> list:
    client = MlflowClient(tracking_uri_for(run_dir, None))
    return sorted(client.search_model_versions("name='tiny-stream'"), key=lambda v: int(v.version))


def _files(stages) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for s in stages for p in sorted(Path(s.model_uri).iterdir())}


@pytest.fixture(scope="module")
def three(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    path = make_stream(root, **STREAM)
    result, _ = _run(path)
    return root, path, result


def test_an_appended_task_trains_one_new_stage(three):
    root, path, first = three
    before = _files(first.stages)
    spec = yaml.safe_load(path.read_text())
    four = make_stream(root, tasks=[*NAMES, "bird"], **STREAM)  # the same stream, a fourth task appended
    assert yaml.safe_load(four.read_text())["tasks"][:3] == spec["tasks"]
    result, printed = _run(four)
    assert "continuing tiny-stream" in printed and "training stage 4/4 (bird) from stage 3's model" in printed
    assert [s.task for s in result.stages] == [*NAMES, "bird"]
    assert result.stages[:3] == first.stages  # read back from storage, not trained again
    assert result.stages[3].start["weights_digest"] == weights_digest(
        load_file(str(Path(first.stages[2].model_uri) / "model.safetensors"))
    )
    assert _files(first.stages) == before  # the first three stages' folders are untouched
    versions = _versions(root / "run")
    assert [int(v.version) for v in versions] == [1, 2, 3, 4]
    assert versions[3].tags["parent_version"] == "3" and versions[3].tags["task"] == "bird"
    assert versions[3].tags["tasks"] == "first,second,animal,bird"
    assert len(result.matrix) == 4 and result.matrix[3][3] is not None


def test_start_from_a_registered_version(three, tmp_path):
    root, _, first = three
    other = make_stream(tmp_path, tasks=["bird"], **STREAM)
    spec = yaml.safe_load(other.read_text())
    spec |= {"model": str(root / "model"), "mlflow": {"tracking_uri": tracking_uri_for(root / "run", None)}}
    other.write_text(yaml.safe_dump(spec))
    result, printed = _run(other, start_from="models:/tiny-stream/2")
    assert "from models:/tiny-stream/2: " + first.stages[1].model_uri in printed
    v2 = Path(first.stages[1].model_uri)
    start = result.stages[0].start
    assert start["weights_digest"] == weights_digest(load_file(str(v2 / "model.safetensors")))
    memory = load_file(str(v2 / "method_state.safetensors"))
    assert start["memory"] == {k: list(t.shape) for k, t in memory.items()} and memory  # v2's task memory
    assert result.sequence_id != first.sequence_id  # a sequence of its own


def test_a_stream_whose_earlier_task_changed_is_refused(three):
    root, path, _ = three
    spec = yaml.safe_load(path.read_text())
    spec["tasks"][1]["train"] = str(root / "first.train.jsonl")  # stage 2's data differ now
    changed = root / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"task 'second': its training data changed since stage 2 was trained"):
        _run(changed)


def test_method_override_validates_the_streams_method_args(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    path = make_stream(tmp_path, **STREAM)  # gorp's method_args: full_rank_lr means nothing to lora
    out = CliRunner().invoke(app, ["run", str(path), "--method", "lora"])
    assert out.exit_code == 2, out.output
    assert "method 'lora' got unknown hyperparameters ['full_rank_lr']" in out.output
    run_dir = tmp_path / "run"  # refused before anything was recorded or trained (the lease is released)
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "sequences").exists()
    assert not list((run_dir / "leases").iterdir()) and not (run_dir / "ray").exists()
