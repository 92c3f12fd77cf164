"""`gorp retrain --once` as a separate process with slowed steps, for the killed-watcher test: ``python
retrain_main.py STREAM INBOX RUN_DIR --step-sleep S``. The sleep runs in the workers through the sequence's hooks;
production code reads no fault switch."""

from __future__ import annotations

import argparse

from deploy.retrain import retrain_once
from pipeline_fixtures import SlowSteps

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("stream")
    parser.add_argument("inbox")
    parser.add_argument("run_dir")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    decisions = retrain_once(args.stream, args.inbox, run_dir=args.run_dir, hooks=SlowSteps(args.step_sleep))
    print(f"done: {len(decisions)} task(s)")
