"""What a sequence returns: one :class:`StageResult` per completed stage, a :class:`SequenceResult` at the end.

A stage's result travels from rank 0 to the driver through Ray (see :mod:`pipelines.sequence`) and is also written as
``stage.json`` into the stage's model folder in the run's storage, last, so that its presence marks the stage
complete and any machine that can reach the storage can read it back (:meth:`StageResult.load`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gorp.metrics import summarize

STAGE_FILE = "stage.json"


@dataclass
class StageResult:
    """One completed stage: stage ``stage`` trained task ``task`` (0-based; the CLI prints ``stage + 1``)."""

    stage: int
    task: str
    method: str
    model_uri: str  # the stage's model folder (weights, tokenizer, method state): a local path or a URI
    row: dict[str, float]  # task -> accuracy after this stage: every task seen so far, and the next one
    zero_shot: dict[str, float] = field(default_factory=dict)  # task -> base-model accuracy (first stage only)
    losses: list[float] = field(default_factory=list)  # per optimizer step (this attempt: from resumed_from on)
    steps: int = 0
    resumed_from: int = 0  # the step a checkpoint resumed this stage from (0: trained from its start)
    timings: dict[str, float] = field(default_factory=dict)  # setup_s, train_s, finalize_s, eval_s, zero_shot_s
    tokens_per_s: float = 0.0
    world_size: int = 1
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank
    data_digests: dict[str, str] = field(default_factory=dict)  # split -> sha256 of its data file
    start: dict[str, Any] = field(default_factory=dict)  # what it started from: weights_digest, memory (shapes)
    # task -> its most frequent answers after this stage (normalized, with counts; the rest under "(other)"): what a
    # drop in accuracy looks like, e.g. an earlier task answered with the new task's labels
    answers: dict[str, dict[str, int]] = field(default_factory=dict)
    # what the method measured while training (ContinualMethod.task_stats), e.g. the share of gorp's gradient that its
    # task memory removed; after a resume, over the steps since the checkpoint
    method_stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, model_uri: str) -> StageResult:
        """The result stored beside a stage's model (``<model_uri>/stage.json``)."""
        from pipelines import storage

        return cls.from_dict(
            {**json.loads(storage.read_text(storage.join(model_uri, STAGE_FILE))), "model_uri": model_uri}
        )


@dataclass
class SequenceResult:
    """The stages of a sequence so far, in order (earlier stages it continued from included), and their metrics."""

    name: str
    sequence_id: str
    tasks: list[str]  # every task of the stream, in order
    stages: list[StageResult]
    timings: dict[str, float] = field(default_factory=dict)  # ray_start_s, data_s, fit_s (this call's work)

    @property
    def complete(self) -> bool:
        return len(self.stages) == len(self.tasks)

    @property
    def matrix(self) -> list[list[float | None]]:
        """R[t][i]: accuracy on task i after stage t (None where not evaluated)."""
        return [[s.row.get(name) for name in self.tasks] for s in self.stages]

    @property
    def zero_shot(self) -> list[float | None]:
        first = self.stages[0].zero_shot if self.stages else {}
        return [first.get(name) for name in self.tasks]

    @property
    def summary(self) -> dict[str, float | None]:
        """AA, BWT, FWT and forgetting after the last completed stage (None before the first)."""
        if not self.stages:
            return dict.fromkeys(("aa", "bwt", "fwt", "forgetting"))
        return summarize(self.matrix, self.zero_shot)

    @property
    def last(self) -> StageResult | None:
        return self.stages[-1] if self.stages else None
