"""cluster.yaml through the Ray cluster launcher's own preparation and schema.

``ray up`` runs ``prepare_config`` (defaults of the provider, merged setup commands, per-type max workers) and then
``validate_config`` (``ray/autoscaler/ray-schema.json`` plus its cross-field checks) before it talks to the cloud;
those two steps need no credentials and are what is checked here. The provider's bootstrap (IAM, subnets, security
groups, AMI lookup) needs an AWS account and is not."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def check(config: dict) -> dict:
    """What `ray up` does to a config before it touches the cloud; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_launchers_validation():
    prepared = check(load())
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert "GPU" not in head["resources"]  # a CPU head
    assert head["max_workers"] == 0  # filled in by prepare_config
    [(name, gpu)] = workers.items()
    assert gpu["resources"]["GPU"] >= 1
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= prepared["max_workers"]
    # the checkout is copied to every node and installed there; the mount's source is this repository
    assert prepared["file_mounts"] == {"~/gorp": "./"}
    assert (ROOT / "pyproject.toml").exists()
    assert any(cmd.startswith("pip install") and "~/gorp" in cmd for cmd in prepared["setup_commands"])
    # merged by prepare_config: the head also installs the project before its own commands
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]
    # the runs' storage: the MLflow server keeps its artifacts in the bucket; the dashboard stays on loopback
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--artifacts-destination s3://" in start
    assert "--dashboard-host=127.0.0.1" in start and "--host 127.0.0.1" in start


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(max_worker=c.pop("max_workers")),  # misspelled top-level key
        lambda c: c["available_node_types"]["gpu"].update(min_worker=0),  # misspelled key of a node type
        lambda c: c["docker"].update(pull_befor_run=True),  # misspelled docker key
        lambda c: c["available_node_types"]["gpu"].update(max_workers="4"),  # wrong type
        lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU=-1),  # below the minimum
    ],
    ids=["max_worker", "min_worker", "pull_befor_run", "max_workers-str", "negative-gpu"],
)
def test_a_broken_cluster_yaml_fails_the_schema(mutate):
    config = load()
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        check(config)


def test_cross_field_checks_fail_too():
    config = load()
    config["head_node_type"] = "heda"
    with pytest.raises(ValueError, match="head_node_type"):
        check(config)
    config = load()
    config["available_node_types"]["gpu"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        check(config)
