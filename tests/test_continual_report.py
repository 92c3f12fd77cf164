"""The continual benchmark's report (benchmarks/continual.py) on hand-made results: the table's numbers, the command
that reproduces the grid, what counts as a method's memory, and the plots written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("continual_bench", ROOT / "benchmarks" / "continual.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TASKS = ["a", "b"]


def record(config: str, seed: int, matrix, stats=None) -> dict:
    from gorp.metrics import summarize

    method = config.partition(":")[0]
    return {
        "config": config,
        "method": method,
        "method_args": {},
        "seed": seed,
        "tasks": TASKS,
        "matrix": matrix,
        "zero_shot": [0.0, 0.0],
        "summary": summarize(matrix, [0.0, 0.0]),
        "train_s": [10.0 + seed, 12.0 + seed],
        "final_loss": [0.5, 0.4],
        "memory": [{"tensors": 0, "mean_fill": 0.0, "max_fill": 0.0}] * 2,
        "answers": [{"a": {"x": 4}}, {"a": {"y": 3, "x": 1}, "b": {"z": 4}}],
        "method_stats": stats or [{}, {}],
        "caps": {"steps": 4, "batch": 2, "eval": 4, "shuffle": True},
        "machine": "test machine",
        "load_before": 0.5,
        "load_after": 1.5,
    }


def test_config_names_parse_and_map_to_file_names(bench):
    assert bench.parse_config("gorp:adapter_init=kaiming;scale=1") == ("gorp", {"adapter_init": "kaiming", "scale": 1})
    assert bench.parse_config("lora") == ("lora", {})
    assert bench.safe("gorp:adapter_init=kaiming;scale=1") == "gorp_adapter_init-kaiming_scale-1"


def test_only_subspace_memories_count_as_memory(bench):
    shapes = {"memory/q.lora_A": [64, 4], "old_a/v": [8, 32], "replay/input_ids": [32, 100], "lora/q.lora_B": [64, 8]}
    use = bench.memory_use(shapes)
    assert use["tensors"] == 2
    assert use["mean_fill"] == pytest.approx((4 / 64 + 8 / 32) / 2) and use["max_fill"] == pytest.approx(0.25)
    assert bench.memory_use({"replay/input_ids": [32, 100]})["tensors"] == 0


def test_report_table_command_and_plots(bench, tmp_path):
    removed = [{}, {"memory_removed_lora_a": 0.6, "memory_removed_lora_a_max": 0.9}]
    recs = [
        record("lora", 0, [[1.0, None], [0.5, 1.0]]),  # AA 75, BWT -50
        record("lora", 1, [[1.0, None], [0.7, 0.9]]),  # AA 80, BWT -30
        record("gorp:scale=1", 0, [[0.8, None], [0.8, 0.6]], removed),  # AA 70, BWT 0
    ]
    out = tmp_path / "results"
    out.mkdir()
    for r in recs:
        (out / f"{bench.safe(r['config'])}-seed{r['seed']}.json").write_text(json.dumps(r))
    text = bench.report(out, tmp_path / "docs")

    assert (out / "summary.md").read_text() == text
    cmd = "python benchmarks/continual.py --configs 'gorp:scale=1,lora' --seeds 0,1 --steps 4 --batch 2 --eval 4"
    assert text.splitlines()[0] == f"`{cmd}`"
    assert "test machine; load average 0.5-1.5 during the runs" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    # FWT "-": no task was scored before its stage; train s/stage: the faster seed's mean
    # AA over stages: seed 0 (100 + 75) / 2, seed 1 (100 + 80) / 2
    assert rows["lora"][1:8] == ["2", "77.5 ± 3.5", "88.8 ± 1.8", "-40.0 ± 14.1", "-", "40.0 ± 14.1", "11"]
    assert rows["gorp:scale=1"][1:5] == ["1", "70.0", "75.0", "0.0"]
    assert "- lora: a 100->60, b 95->95" in text
    assert "- gorp:scale=1 (1 seeds), stage 1 to 2: LoRA A: 60% (90%); full-rank: " in text
    assert "- lora seed 0: a 100 -> 50 after stage 2 (b); it answered: y 3, x 1" in text
    assert "- lora seed 1: a 100 -> 70 after stage 2 (b)" in text and "gorp:scale=1 seed 0: a" not in text
    for png in ("continual-aa.png", "continual-matrices.png"):
        assert (tmp_path / "docs" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
