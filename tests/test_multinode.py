"""A continual run on a simulated two-node Ray cluster (ray.cluster_utils.Cluster), one FSDP2 worker on each node."""

from __future__ import annotations

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline_fixtures import make_stream
from pipelines.run import run_stream
from pipelines.spec import load_stream


@pytest.fixture
def two_nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"},
    )
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_stages_across_two_nodes(two_nodes, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    stream = load_stream(make_stream(tmp_path, num_workers=2, fsdp=True, max_steps=3))
    results = run_stream(stream)
    assert len(results["matrix"]) == 3
    for path in sorted((tmp_path / "run").glob("sequences/*/*/model/stage.json")):
        rec = json.loads(path.read_text())
        assert rec["world_size"] == 2
        assert len(set(rec["nodes"])) == 2, f"both ranks ran on one node: {rec['nodes']}"
