"""The search file (tuning.search), what a trial reports per stage (tuning.trial.stage_metrics) and how many trials
run at once (tuning.run.concurrent_trials): no Ray, no training."""

from __future__ import annotations

import pytest

from pipelines.results import SequenceResult, StageResult
from pipelines.spec import SpecError
from tuning.search import Objective, load_search


def _search(tmp_path, text):
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return load_search(path)


def test_search_file_is_validated_and_names_the_bad_key(tmp_path):
    s = _search(tmp_path, "space:\n  lr: {loguniform: [1.0e-4, 1.0e-1]}\n  rank: {grid: [4, 8]}\n")
    assert s.name == "search" and s.scheduler.kind == "asha" and s.space["rank"].kind == "grid"
    s = _search(tmp_path, "space: {lr: {grid: [1e-5, 2.5e-4, 3, 1.0e-3]}, refresh: {choice: [fixed, 1e3x]}}\n")
    assert s.space["lr"].grid == [1e-5, 2.5e-4, 3, 1e-3] and s.space["refresh"].choice == ["fixed", "1e3x"]
    assert all(isinstance(v, (int, float)) for v in s.space["lr"].grid)  # YAML's text "1e-5" is a number here
    with pytest.raises(SpecError, match=r"search.yaml: scheduler.grace: unknown key"):
        _search(tmp_path, "space: {lr: {choice: [1]}}\nscheduler: {grace: 1}\n")
    with pytest.raises(SpecError, match=r"space.lr: give exactly one of .* \(got choice, grid\)"):
        _search(tmp_path, "space: {lr: {choice: [1], grid: [2]}}\n")
    with pytest.raises(SpecError, match=r"space.lr: the range must be \[low, high\]"):
        _search(tmp_path, "space: {lr: {uniform: [0.1, 0.01]}}\n")


def test_space_keys_the_method_does_not_take_fail_before_ray(tmp_path):
    from pipelines.spec import parse_stream
    from tuning.search import check_space

    stream = parse_stream(
        {
            "name": "s",
            "model": str(tmp_path),
            "method": "lora",
            "tasks": [{"name": "t", "train": "a.jsonl", "test": "b.jsonl"}],
        }
    )
    check_space(_search(tmp_path, "space: {lr: {choice: [0.1]}, lora_r: {grid: [4, 8]}}\n"), stream)
    with pytest.raises(SpecError, match="update_gap"):
        check_space(_search(tmp_path, "space: {update_gap: {choice: [5]}}\n"), stream)


def _stage(t, task, row):
    return StageResult(stage=t, task=task, method="gorp", model_uri="", row=row)


def test_stage_metrics_are_the_sequence_metrics_of_the_tasks_seen_so_far():
    from tuning.trial import stage_metrics

    tasks = ["a", "b", "c"]
    stages = [_stage(0, "a", {"a": 0.9, "b": 0.1}), _stage(1, "b", {"a": 0.5, "b": 0.8, "c": 0.2})]
    w = Objective(forgetting_weight=0.5)
    first = stage_metrics(SequenceResult("s", "x", tasks, stages[:1]), w)
    assert first == {"stage": 1.0, "objective": 0.9, "aa": 0.9, "acc_a": 0.9}  # no BWT/forgetting after one stage
    second = stage_metrics(SequenceResult("s", "x", tasks, stages), w)
    # by hand: AA = (0.5 + 0.8) / 2; BWT = 0.5 - 0.9; forgetting of a = 0.9 - 0.5; objective = AA - 0.5 * 0.4
    assert second == pytest.approx(
        {"stage": 2, "aa": 0.65, "bwt": -0.4, "forgetting": 0.4, "objective": 0.45, "acc_a": 0.5, "acc_b": 0.8}
    )


def test_concurrent_trials_follow_the_workers_resources():
    from pipelines.spec import Scaling
    from tuning.run import DRIVER_CPU, DRIVER_MEMORY, concurrent_trials, driver_cpu, driver_resources

    class S:
        scaling = Scaling(num_workers=1, cpus_per_worker=0.9)

    assert concurrent_trials(S, {"CPU": 2}, None) == 2  # the drivers' slivers leave room for both worker groups
    assert concurrent_trials(S, {"CPU": 2}, 1) == 1
    S.scaling = Scaling(num_workers=1, cpus_per_worker=1)
    assert concurrent_trials(S, {"CPU": 2}, None) == 1  # two groups and two slivers do not fit in 2 CPUs
    S.scaling = Scaling(num_workers=1, cpus_per_worker=2)  # the quickstart on 2 CPUs: the driver takes none
    assert concurrent_trials(S, {"CPU": 2}, None) == 1 and driver_cpu(S, {"CPU": 2}) == 0
    assert driver_resources(S, {"CPU": 2}) == {"CPU": 0.0, "memory": DRIVER_MEMORY}  # Tune needs some resource
    assert driver_cpu(S, {"CPU": 3}) == DRIVER_CPU and driver_resources(S, {"CPU": 3}) == {"CPU": DRIVER_CPU}
    S.scaling = Scaling(num_workers=2, cpus_per_worker=1)
    assert concurrent_trials(S, {"CPU": 2}, None) == 1
    assert concurrent_trials(S, {"CPU": 16}, 3) == 3
    S.scaling = Scaling(num_workers=2, use_gpu=True)
    assert concurrent_trials(S, {"CPU": 16, "GPU": 4}, None) == 2
