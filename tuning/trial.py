"""One trial of a search: a whole continual sequence through :func:`pipelines.sequence.run_sequence`, scored on
validation, reporting to Tune once per completed stage.

The report comes from the trial's own driver (a :class:`~pipelines.sequence.Callback` in the Tune function), after
the stage's result has arrived: Ray Train's mid-stage checkpoint reports stay inside the trial's TorchTrainer and
never reach Tune, so the scheduler sees exactly one result per stage and ``stage`` (1, 2, ...) is its time axis.

Each report carries a small Tune checkpoint: the results of the stages done so far (``history.json``; the stage models
stay in the trial's storage). A trial that Tune starts again (paused by successive halving, or a search resumed after
its driver died) continues after its last reported stage with that history, and reports no stage twice.

``chunk_ends``: where the trial's worker group stops. Under ASHA a trial runs its whole sequence on one worker group;
under successive halving the group ends at every rung (a stage boundary), so that a trial paused there holds nothing
and has trained nothing past it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.results import StageResult
from pipelines.sequence import Callback

STARTS = "trial_starts.log"  # "<trial id> <unix time>" per trial start (a resumed or unpaused trial adds a line)
SLOTS = "trial_slots.log"  # "<trial id> take|give <unix time>": a halving search's worker groups (tuning.halving)
HISTORY = "history.json"  # in a trial's Tune checkpoint: the results of its completed stages


class StageReporter(Callback):
    """Reports AA, BWT, forgetting over the tasks seen so far, each seen task's accuracy, the objective and the stage
    (1-based) to Tune when a stage ends."""

    def __init__(self, objective, before_last_report=None):
        self.objective, self.stages, self.cache_hit = objective, [], 0.0
        self.before_last_report = before_last_report  # called before the report of the plan's last stage

    def on_start(self, plan) -> None:
        self.cache_hit = float(all(p.split.cache_hit for p in plan.prepared))

    def on_stage_end(self, plan, result) -> None:
        import ray.tune

        self.stages.append(result)
        if self.before_last_report is not None and result.stage + 1 == len(plan.tasks):
            self.before_last_report()
        seq = plan.result(self.stages)
        with tempfile.TemporaryDirectory(prefix="gorp-trial-") as folder:  # Tune copies it into the trial's storage
            Path(folder, HISTORY).write_text(json.dumps([dataclasses.asdict(s) for s in seq.stages]))
            metrics = stage_metrics(seq, self.objective) | {"cache_hit": self.cache_hit}
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def reported_history() -> list[StageResult]:
    """The stages this trial reported before Tune stopped it (its latest checkpoint), or none on a first start."""
    import ray.tune

    ckpt = ray.tune.get_checkpoint()
    if ckpt is None:
        return []
    with ckpt.as_directory() as folder:
        return [StageResult.from_dict(d) for d in json.loads(Path(folder, HISTORY).read_text())]


def chunk_ends(n_stages: int, done: int, rungs: list[int] | None) -> list[int]:
    """The stage counts at which the trial's worker group ends: every rung after ``done``, and the last stage."""
    return sorted({r for r in rungs or [] if done < r < n_stages} | {n_stages})


def stage_metrics(seq, objective) -> dict[str, float]:
    """What a trial reports after its latest stage (None metrics, e.g. BWT after the first stage, left out)."""
    summary = seq.summary
    t = len(seq.stages)
    out: dict[str, Any] = {"stage": t, "objective": objective.score(summary)}
    out |= {k: summary[k] for k in ("aa", "bwt", "forgetting") if summary[k] is not None}
    out |= {f"acc_{task}": seq.stages[-1].row.get(task) for task in seq.tasks[:t]}
    return {k: float(v) for k, v in out.items() if v is not None}


def run_trial(
    config: dict[str, Any],
    *,
    stream_data: dict,
    search_dir: str,
    objective,
    rungs: list[int] | None = None,
    slots: str | None = None,
) -> None:
    """The Tune function: the stream with this trial's method and method_args, every stage after the ones it already
    reported, scored on validation; its worker group ends at each of ``rungs`` (stage counts), and runs only while
    the trial holds one of the search's ``slots`` (a named actor; None: no limit here)."""
    import ray.tune

    from pipelines.sequence import run_sequence
    from pipelines.spec import parse_stream
    from tuning.halving import TrialSlots

    trial_id = ray.tune.get_context().get_trial_id()
    root = Path(search_dir)
    with open(root / STARTS, "a", encoding="utf-8") as f:
        f.write(f"{trial_id} {time.time():.3f}\n")
    method = config["method"]
    args = {k: v for k, v in config.items() if k != "method"}
    base = stream_data["method_args"] if method == stream_data["method"] else {}
    stream = parse_stream({**stream_data, "method": method, "method_args": base | args}, where=f"trial {trial_id}")
    trial_dir = root / "trials" / trial_id
    history = reported_history()
    for end in chunk_ends(len(stream.tasks), len(history), rungs):
        part = stream.model_copy(update={"tasks": stream.tasks[:end]})  # the same sequence (its id omits the tasks)
        with TrialSlots(slots, trial_id, root / SLOTS) as slot:
            history = run_sequence(
                part,
                history=history,
                callbacks=[StageReporter(objective, before_last_report=slot.release)],  # the report may pause it
                storage=str(trial_dir),
                run_dir=trial_dir,
                cache_dir=root / "cache",
                eval_split="validation",
            ).stages
