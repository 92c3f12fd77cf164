"""Storage anywhere: a real S3 API on loopback (moto's server), a two-node Ray cluster, data read from ``s3://`` URIs
and the run's storage an ``s3://`` URI. The driver's disk holds no stage model; every registered version points into
the bucket, and a fresh process loads one from the registry alone and scores what was recorded. Also the storage
helpers themselves, and model ids resolved through a Hugging Face cache laid out as the hub lays it out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from pipeline_fixtures import NAMES, make_model, make_stream, s3_server
from pipelines import storage
from pipelines.registry import tracking_uri_for
from pipelines.run import run_stream
from pipelines.spec import load_stream

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "gorp-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 API on 127.0.0.1, in this process's environment (and the Ray workers')."""
    with s3_server(BUCKET, set_environ=True) as env:
        yield env


def test_storage_helpers_on_a_bucket_and_a_folder(s3, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)))
    for root in (f"s3://{BUCKET}/helpers", str(tmp_path / "local")):
        dst = storage.join(root, "x", "folder")
        storage.upload_dir(src, dst)
        assert storage.exists(storage.join(dst, "a.txt")) and not storage.exists(storage.join(dst, "nope"))
        assert storage.read_text(storage.join(dst, "a.txt")) == "alpha"
        storage.write_text(storage.join(dst, "c.json"), '{"k": 1}')
        copy = storage.local_dir(dst, tmp_path / "cache")
        assert (copy / "sub" / "b.bin").read_bytes() == bytes(range(256))
        assert json.loads((copy / "c.json").read_text()) == {"k": 1}
    assert storage.ray_storage(f"s3://{BUCKET}/runs/ray")[0] == f"{BUCKET}/runs/ray"
    with pytest.raises(FileNotFoundError):
        storage.download_dir(f"s3://{BUCKET}/missing", tmp_path / "m")


def test_model_from_a_uri_and_from_the_hugging_face_cache(s3, tmp_path, monkeypatch):
    from pipelines.demo_model import resolve_model

    folder = make_model(tmp_path / "model", ["some words here"])
    storage.upload_dir(folder, f"s3://{BUCKET}/models/tiny")
    monkeypatch.setenv("GORP_CACHE", str(tmp_path / "gorp-cache"))
    got = resolve_model(f"s3://{BUCKET}/models/tiny")
    assert (got / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    # the hub's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}
    hub = tmp_path / "hub"
    snap = hub / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    snap.parent.mkdir(parents=True)
    os.symlink(folder, snap)
    (hub / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny-org/tiny-llama") == snap
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model("tiny-org/absent")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_nodes(s3):
    cluster = Cluster(
        initialize_head=True,
        # a free dashboard port: the default 8265 may be taken by another Ray on this machine
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
        },
    )
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _to_bucket(path: Path, prefix: str) -> Path:
    """Upload the stream's data files to the bucket and point the stream at their URIs."""
    spec = yaml.safe_load(path.read_text())
    for task in spec["tasks"]:
        for split in ("train", "test"):
            uri = f"s3://{BUCKET}/{prefix}/{task[split]}"
            fs, key = storage.filesystem(uri)
            with fs.open_output_stream(key) as f:
                f.write((path.parent / task[split]).read_bytes())
            task[split] = uri
    path.write_text(yaml.safe_dump(spec))
    return path


LOAD_AND_SCORE = """
import json, sys
from gorp.models import load_model
from pipelines.data import load_eval_set
from pipelines.registry import load_version
from pipelines.spec import load_stream
from pipelines.worker import _evaluate
stream, uri = load_stream(sys.argv[1]), sys.argv[2]
task = stream.tasks[1]
folder = load_version("models:/tiny-stream/2", uri)
model, tok = load_model(folder)
row, _ = _evaluate(model, tok, {task.name: load_eval_set(task, sys.argv[3])}, [task.name], 8)
print(json.dumps({"folder": str(folder), "acc": row[task.name]}))
"""


def test_a_run_on_two_nodes_with_data_and_storage_in_s3(two_nodes, s3, tmp_path):
    # FSDP2 over the two nodes, with activation checkpointing per block
    stream_path = make_stream(tmp_path, num_workers=2, fsdp=True, training={"activation_checkpointing": True})
    path = _to_bucket(stream_path, "data")
    stream = load_stream(path)
    assert stream.tasks[0].train.startswith("s3://")
    result = run_stream(stream, storage=f"s3://{BUCKET}/runs")
    run_dir = tmp_path / "run"
    assert [s.task for s in result.stages] == NAMES
    assert all(len(set(s.nodes)) == 2 for s in result.stages), [s.nodes for s in result.stages]
    assert not list(run_dir.rglob("model.safetensors")) and not (run_dir / "sequences").exists()
    uri = tracking_uri_for(run_dir, None)
    versions = sorted(MlflowClient(uri).search_model_versions("name='tiny-stream'"), key=lambda v: int(v.version))
    assert [v.source for v in versions] == [s.model_uri for s in result.stages]
    assert all(v.source.startswith(f"s3://{BUCKET}/runs/sequences/") for v in versions)
    recorded = MlflowClient(uri).get_run(versions[1].run_id).data.metrics[f"acc/{NAMES[1]}"]
    env = {**os.environ, "GORP_CACHE": str(tmp_path / "fresh-cache"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SCORE, str(path), uri, str(tmp_path / "q")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["folder"].startswith(str(tmp_path / "fresh-cache"))  # downloaded from the bucket, not the run dir
    assert got["acc"] == recorded  # the version reproduces its recorded accuracy exactly
