"""What a user reads: `gorp run` through the real command line prints gorp's own lines only; Ray's start-up lines, its
C++ core-worker lines, warnings and MLflow's database chatter go to the run directory's log file, named once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline_fixtures import make_stream

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"Traceback|core_worker|WARNING|\bE \d+ \d+\]|Token authentication|Creating initial MLflow")


def test_the_terminal_holds_gorps_lines_and_the_log_holds_the_rest(tmp_path):
    path = make_stream(tmp_path, num_workers=1, fsdp=False, max_steps=2, tasks=["first"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    printed = out.stdout + out.stderr
    log = tmp_path / "run" / "gorp.log"
    assert f"log: {log}" in printed and "registered tiny-stream version 1" in printed
    # not a terminal: progress comes as plain lines (a bar would show only at the end)
    assert "stage 1/1: first: 2 steps" in printed and re.search(r"step 2/2  loss \d+\.\d{3}", printed)
    assert not NOISE.search(printed), NOISE.search(printed)
    text = log.read_text()
    assert "Started a local Ray instance" in text and "WARNING" in text and "Creating initial MLflow" in text


def test_validate_prints_the_memory_plan(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    path = make_stream(tmp_path, num_workers=2, fsdp=True, training={"precision": "bf16"})
    out = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    assert "memory per worker: gorp, bf16, batch 8 over 2 worker(s), sequences up to 70 tokens" in out.output
    head = next(line for line in out.output.splitlines() if line.startswith("per worker"))
    assert head.split() == ["per", "worker", "no", "FSDP", "FSDP", "x2"]
    peak = next(line for line in out.output.splitlines() if line.startswith("estimated peak"))
    assert len(peak.split()) == 6  # a figure and its unit for each column
    assert "optimizer state by method (no FSDP): lora" in out.output
