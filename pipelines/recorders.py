"""Callbacks of a sequence that ``gorp run`` wires in, besides the MLflow recorder (:mod:`pipelines.lineage`):

* :class:`ResultsWriter`: ``<run_dir>/results.json``, ``heatmap.png``, ``forgetting.png``, ``timings.json`` after every
  stage, and ``progress.jsonl`` (one row per optimizer step: stage, step, loss, tokens/s, elapsed seconds);
* :class:`ProgressDisplay`: a rich progress bar per stage on the terminal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.report import plot_forgetting, plot_heatmap, write_results
from pipelines.results import SequenceResult, StageResult
from pipelines.sequence import Callback, SequencePlan

PROGRESS_FILE = "progress.jsonl"


def stage_summary(result: StageResult) -> dict[str, Any]:
    """The per-stage entry of ``results.json``."""
    timings = result.timings
    return {
        "task": result.task,
        "train_s": timings.get("train_s"),
        "eval_s": timings.get("eval_s"),
        "tokens_per_s": result.tokens_per_s,
    }


class ResultsWriter(Callback):
    """The run directory's result files, rewritten as each stage completes."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.results: dict[str, Any] = {}
        self.stages: list[StageResult] = []

    def on_start(self, plan: SequencePlan) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stages = list(plan.history)

    def on_progress(self, plan: SequencePlan, stage: int, row: dict[str, float]) -> None:
        with (self.run_dir / PROGRESS_FILE).open("a") as f:
            f.write(json.dumps({"stage": stage, **row}) + "\n")

    def on_stage_end(self, plan: SequencePlan, result: StageResult) -> None:
        self.stages.append(result)
        self.write(SequenceResult(plan.stream.name, plan.sequence_id, plan.tasks, self.stages))

    def write(self, seq: SequenceResult) -> dict[str, Any]:
        names, matrix, zero_shot = seq.tasks, seq.matrix, seq.zero_shot
        self.results = write_results(self.run_dir, names, matrix, zero_shot, [stage_summary(s) for s in seq.stages])
        plot_heatmap(self.run_dir / "heatmap.png", names, matrix)
        plot_forgetting(self.run_dir / "forgetting.png", names, matrix, zero_shot)
        return self.results

    def on_end(self, plan: SequencePlan, result: SequenceResult) -> None:
        timings = {**result.timings, "stages": [{"stage": s.stage, **s.timings} for s in result.stages]}
        (self.run_dir / "timings.json").write_text(json.dumps(timings, indent=1))
        if not self.results and result.stages:  # nothing ran (complete already): the files still describe it
            self.write(result)


class ProgressDisplay(Callback):
    """One rich progress bar per stage: steps, loss, tokens/s, elapsed and remaining time. Where the output is not a
    terminal (a file, CI, a Ray job's or a pod's log) a bar would show only at the end: there, a plain line at each
    stage's start and every fifth of its steps instead."""

    def __init__(self, console):
        self.console, self.progress, self.bars = console, None, {}
        self.plain = not console.is_terminal

    def on_start(self, plan: SequencePlan) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.plain:
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}")]
        columns += [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        # the driver shares the cores with the training worker: a step takes seconds on CPU, so four redraws a
        # second lose nothing a user sees
        self.progress = Progress(*columns, console=self.console, refresh_per_second=4)
        self.progress.start()

    def on_stage_start(self, plan: SequencePlan, stage: int) -> None:
        label = f"stage {stage + 1}/{len(plan.tasks)}: {plan.tasks[stage]}"
        if self.plain:
            self.bars[stage] = time.monotonic()
            self.console.print(f"{label}: {plan.steps[stage]} steps", highlight=False)
            return
        self.bars[stage] = self.progress.add_task(label, total=plan.steps[stage], info="start")

    def on_progress(self, plan: SequencePlan, stage: int, row: dict[str, float]) -> None:
        info = f"loss {row['loss']:.3f}  {row['tokens_per_s']:.0f} tok/s"
        if self.plain:
            total, step = plan.steps[stage], int(row["step"])
            if step == total or step % max(1, total // 5) == 0:
                took = time.monotonic() - self.bars[stage]
                self.console.print(f"  step {step}/{total}  {info}  {took:.0f} s", highlight=False)
            return
        self.progress.update(self.bars[stage], completed=row["step"], info=info)

    def on_stage_end(self, plan: SequencePlan, result: StageResult) -> None:
        if not self.plain:
            self.progress.update(self.bars[result.stage], completed=plan.steps[result.stage], info="done")

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_end(self, plan: SequencePlan, result: SequenceResult) -> None:
        self._stop()

    def on_failure(self, plan: SequencePlan, stage: int, error: BaseException | None) -> None:
        self._stop()
