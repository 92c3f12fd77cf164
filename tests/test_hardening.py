"""Hardening without Ray (issue 10): what fails fast and what is refused, each asserting the message a user reads.

- a global batch larger than a task's training set fails in ``gorp validate`` (naming the task and the key);
- an unreachable tracking server fails in seconds, before Ray starts (refused port and a silent one);
- a ``trust_remote_code`` model whose module file is missing is refused naming the file;
- a registered version whose weights changed after registration (a flipped byte, a truncated file) is refused on
  load, naming the version and the file;
- ``pytorch_model.bin`` loads only with an explicit opt-in, with ``weights_only``;
- ``on_bad_record: skip`` with no valid record names a quarantine file under ``<run_dir>/quarantine/`` that exists.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline_fixtures import make_stream
from pipelines.cli import app
from pipelines.integrity import IntegrityError
from pipelines.preflight import PreflightError, check_remote_code

SMALL = {"num_workers": 1, "fsdp": False, "max_steps": 4, "tasks": ["first"]}


def test_validate_refuses_a_global_batch_larger_than_a_task(tmp_path):
    path = make_stream(tmp_path, n_train=32, batch_size=33, **SMALL)
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert "task 'first': 32 training rows" in text and "training.batch_size 33" in text
    assert "at most 32" in text
    make_stream(tmp_path, n_train=32, batch_size=32, **SMALL)  # exactly one batch: fine
    ok = CliRunner().invoke(app, ["validate", str(path)])
    assert ok.exit_code == 0, ok.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_unreachable_tracking_server_fails_fast_before_ray(tmp_path, monkeypatch, server):
    import pipelines.sequence

    silent = None
    if server == "silent":  # accepts connections (the kernel's backlog) and never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
    else:
        port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the tracking server was checked")

    monkeypatch.setattr(pipelines.sequence, "init_ray", no_ray)
    path = make_stream(tmp_path, **SMALL)
    try:
        for command in (["validate", str(path)], ["run", str(path)]):
            t = time.perf_counter()
            out = CliRunner().invoke(app, command)
            took = time.perf_counter() - t
            text = " ".join(out.output.split())
            assert out.exit_code == 2, out.output
            assert f"the MLflow tracking server {uri} is unreachable" in text and "mlflow.tracking_uri" in text
            assert took < 15, f"{command[0]}: {took:.1f} s"
        assert not (tmp_path / "run" / "mlflow.db").exists()
    finally:
        if silent is not None:
            silent.close()


def test_missing_remote_code_module_is_refused_naming_the_file(tmp_path):
    path = make_stream(tmp_path, trust_remote_code=True, **SMALL)
    config = tmp_path / "model" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    config.write_text(json.dumps(cfg))
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert f"{tmp_path / 'model' / 'modeling_tiny.py'} is missing" in text and "modeling_tiny.TinyForCausalLM" in text
    (tmp_path / "model" / "modeling_tiny.py").write_text("# the module\n")
    check_remote_code(tmp_path / "model", True)  # there now: passes
    cfg["auto_map"] = {"AutoModelForCausalLM": "someone/else--modeling_tiny.TinyForCausalLM"}
    config.write_text(json.dumps(cfg))
    with pytest.raises(PreflightError, match="another hub repository"):
        check_remote_code(tmp_path / "model", True)
    check_remote_code(tmp_path / "model", False)  # not trusted: the auto_map is never used


def _registered(tmp_path: Path) -> tuple[str, Path]:
    """A version registered through the lineage API, its source the fixture's tiny model folder."""
    from pipelines.lineage import Lineage

    make_stream(tmp_path, **SMALL)
    folder = tmp_path / "model"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lin = Lineage(uri, "hardening")
    parent = lin.start_sequence("tiny", "abc", {}, "abc")
    run = lin.start_stage(parent, 0, "first")
    lin.log_stage_result(run, {"first": 0.5}, {"aa": 0.5, "bwt": 0.0})
    assert lin.register_stage(run, "tiny", folder) == 1
    lin.finish_stage(run)
    return uri, folder


def test_changed_weights_of_a_registered_version_are_refused_naming_it(tmp_path):
    from mlflow import MlflowClient

    from pipelines.registry import load_version

    uri, folder = _registered(tmp_path)
    weights = folder / "model.safetensors"
    tag = json.loads(MlflowClient(uri).get_model_version("tiny", "1").tags["weights_sha256"])
    assert list(tag) == ["model.safetensors"] and len(tag["model.safetensors"]) == 64
    assert load_version("models:/tiny/1", uri) == folder  # intact: loads
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01  # one bit inside the tensors' bytes: safetensors itself cannot tell
    weights.write_bytes(bytes(flipped))
    assert load_file(str(weights)).keys() == load_file(str(weights)).keys()  # it still parses
    with pytest.raises(IntegrityError) as e:
        load_version("models:/tiny/1", uri)
    assert "models:/tiny/1 (version 1)" in str(e.value) and f"{weights} is corrupt" in str(e.value)
    weights.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(IntegrityError, match=r"version 1\).*model.safetensors is corrupt"):
        load_version("models:/tiny/1", uri)
    weights.write_bytes(original)
    assert load_version("models:/tiny/1", uri) == folder


def test_pickled_weights_need_an_explicit_opt_in(tmp_path):
    from gorp.models import load_model

    make_stream(tmp_path, **SMALL)
    folder = tmp_path / "model"
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model.bin\).*allow_pickle_weights=True"):
        load_model(folder)
    model, _ = load_model(folder, allow_pickle_weights=True)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())

    class Payload:  # what a hostile pickle carries: code to run on load
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_model(folder, allow_pickle_weights=True)


def test_no_valid_record_names_a_quarantine_file_that_exists(tmp_path):
    """on_bad_record: skip and not one good record: the error names the first bad record and a quarantine file under
    <run_dir>/quarantine/ that is still there afterwards (it was in a temporary folder, deleted with it)."""
    import yaml

    from pipelines.data import prepare_stream
    from pipelines.records import DataError
    from pipelines.spec import load_stream

    path = make_stream(tmp_path, **SMALL)
    spec = yaml.safe_load(path.read_text())
    spec["tasks"][0]["on_bad_record"] = "skip"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    train = tmp_path / "first.train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({**r, "output": "nonsense"}) + "\n" for r in rows))  # no label is valid
    stream = load_stream(path)
    run_dir = tmp_path / "run"
    t = time.perf_counter()
    with pytest.raises(DataError) as e:
        prepare_stream(stream, tmp_path / "model", run_dir)
    took = time.perf_counter() - t
    quarantine = run_dir / "quarantine" / "first.train.jsonl"
    text = str(e.value)
    assert text == (
        f"{train}: no valid record: {len(rows)} bad, the first {train}:1: label 'nonsense' is not among the options "
        f"{spec['tasks'][0]['labels']}; all in {quarantine}"
    )
    assert quarantine.is_file()  # after the call returned, and its temporary folder is gone
    bad = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [b["line"] for b in bad] == list(range(1, len(rows) + 1))
    assert bad[0]["raw"] == train.read_text().split("\n")[0]
    assert not list((run_dir / "cache").glob("*tmp*"))  # nothing half-built left in the cache
    print(f"no valid record: {took:.2f} s to the message")
