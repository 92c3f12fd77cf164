"""`gorp run` as a separate driver process for the recovery tests: ``python driver_main.py STREAM [--resume]
[--step-sleep S]``. The sleep (in the workers, through the sequence's hooks) slows steps so that a kill lands where
the test wants it; production code reads no fault switch."""

from __future__ import annotations

import argparse

from pipeline_fixtures import SlowSteps
from pipelines.run import run_stream
from pipelines.spec import load_stream

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("stream")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    hooks = SlowSteps(args.step_sleep) if args.step_sleep else None
    result = run_stream(load_stream(args.stream), resume=args.resume, hooks=hooks)
    print(f"done: {len(result.stages)} stages")
