"""One trial of a search: a whole continual sequence through :func:`pipelines.sequence.run_sequence`, scored on
validation, reporting to Tune once per completed stage.

The report comes from the trial's own driver (a :class:`~pipelines.sequence.Callback` in the Tune function), after
the stage's result has arrived: Ray Train's mid-stage checkpoint reports stay inside the trial's TorchTrainer and
never reach Tune, so ASHA sees exactly one result per stage and ``stage`` (1, 2, ...) is its time axis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipelines.sequence import Callback

STARTS = "trial_starts.log"  # "<trial id> <unix time>" per trial start (a resumed search adds the ones it reruns)


class StageReporter(Callback):
    """Reports AA, BWT, forgetting over the tasks seen so far, each seen task's accuracy, the objective and the stage
    (1-based) to Tune when a stage ends."""

    def __init__(self, objective):
        self.objective, self.stages, self.cache_hit = objective, [], 0.0

    def on_start(self, plan) -> None:
        self.cache_hit = float(all(p.split.cache_hit for p in plan.prepared))

    def on_stage_end(self, plan, result) -> None:
        import ray.tune

        self.stages.append(result)
        ray.tune.report(stage_metrics(plan.result(self.stages), self.objective) | {"cache_hit": self.cache_hit})


def stage_metrics(seq, objective) -> dict[str, float]:
    """What a trial reports after its latest stage (None metrics, e.g. BWT after the first stage, left out)."""
    summary = seq.summary
    t = len(seq.stages)
    out: dict[str, Any] = {"stage": t, "objective": objective.score(summary)}
    out |= {k: summary[k] for k in ("aa", "bwt", "forgetting") if summary[k] is not None}
    out |= {f"acc_{task}": seq.stages[-1].row.get(task) for task in seq.tasks[:t]}
    return {k: float(v) for k, v in out.items() if v is not None}


def run_trial(config: dict[str, Any], *, stream_data: dict, search_dir: str, objective) -> None:
    """The Tune function: the stream with this trial's method and method_args, every stage, scored on validation."""
    import ray.tune

    from pipelines.sequence import run_sequence
    from pipelines.spec import parse_stream

    trial_id = ray.tune.get_context().get_trial_id()
    root = Path(search_dir)
    with open(root / STARTS, "a", encoding="utf-8") as f:
        f.write(f"{trial_id} {time.time():.3f}\n")
    method = config["method"]
    args = {k: v for k, v in config.items() if k != "method"}
    base = stream_data["method_args"] if method == stream_data["method"] else {}
    stream = parse_stream({**stream_data, "method": method, "method_args": base | args}, where=f"trial {trial_id}")
    trial_dir = root / "trials" / trial_id
    run_sequence(
        stream,
        callbacks=[StageReporter(objective)],
        storage=str(trial_dir),
        run_dir=trial_dir,
        cache_dir=root / "cache",
        eval_split="validation",
    )
