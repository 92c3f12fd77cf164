"""The search file of ``gorp tune``: the space over ``method_args`` (and optionally the method), the objective, the
scheduler. Validated like the stream: every model forbids unknown keys, so a typo is an error that names the key.

    space:                              # method_args -> one of choice / uniform / loguniform / grid
      lr: {loguniform: [1.0e-4, 1.0e-1]}
      rank: {choice: [4, 8]}
      update_gap: {grid: [5, 10]}
    methods: [gorp, lora]               # optional: a method comparison too (every method gets the whole space)
    objective: {forgetting_weight: 0}   # score = AA - w * forgetting, after the last stage
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}   # or halving, random, grid
    num_samples: 6
    seed: 0
    concurrency: 2
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.spec import SpecError

NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One hyperparameter's distribution: exactly one of the four keys."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    grid: list[Any] | None = Field(None, min_length=1)

    @field_validator("choice", "grid")
    @classmethod
    def _numbers(cls, values: list[Any] | None) -> list[Any] | None:
        """YAML reads 1e-5 (no dot) as text: such values are numbers here, as in uniform and loguniform."""
        return None if values is None else [float(v) if isinstance(v, str) and NUMBER.match(v) else v for v in values]

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        kinds = [k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None]
        if len(kinds) != 1:
            got = ", ".join(kinds) or "none"
            raise ValueError(f"give exactly one of choice, uniform, loguniform, grid (got {got})")
        lo_hi = self.uniform or self.loguniform
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"the range must be [low, high] with low < high (got {list(lo_hi)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive low end")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None)

    def example(self) -> Any:
        """A value of the space (to check the method accepts the key before anything runs)."""
        value = getattr(self, self.kind)
        return value[0]

    def to_tune(self, grid: bool = False):
        from ray import tune

        if self.grid is not None or (grid and self.choice is not None):
            return tune.grid_search(self.grid or self.choice)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)


class Objective(_Strict):
    """score = aa_weight * AA - forgetting_weight * forgetting, over the tasks seen so far (maximized)."""

    aa_weight: float = Field(1.0, gt=0)
    forgetting_weight: float = Field(0.0, ge=0)

    def score(self, summary: dict[str, float | None]) -> float:
        return self.aa_weight * (summary["aa"] or 0.0) - self.forgetting_weight * (summary["forgetting"] or 0.0)


class Scheduler(_Strict):
    """asha: stop trials at stage boundaries as they reach them (the stage index is ASHA's time axis); halving: the
    same rule, synchronous: at each stage boundary every trial waits for the others, and the best
    ceil(n / reduction_factor) go on (:mod:`tuning.halving`); random: every sampled trial runs to the end; grid:
    every point of the grid (choice counts as grid) runs to the end."""

    kind: Literal["asha", "halving", "random", "grid"] = "asha"
    grace_period: int = Field(1, gt=0)  # stages every trial gets before it may be stopped
    reduction_factor: float = Field(2, gt=1)  # the top 1/reduction_factor go on at each rung

    def rungs(self, n_stages: int) -> list[int]:
        """The stage counts at which halving compares trials (ASHA's are Ray's: grace * rate^k)."""
        return list(range(self.grace_period, n_stages)) if self.kind == "halving" else []


class Search(_Strict):
    name: str | None = None  # default: the search file's stem; the output folder is <run_dir>/tune/<name>
    space: dict[str, Param] = Field(min_length=1)
    methods: list[str] | None = Field(None, min_length=1)  # default: the stream's method
    objective: Objective = Objective()
    scheduler: Scheduler = Scheduler()
    num_samples: int = Field(8, gt=0)  # samples of the space (grid points count once per sample)
    seed: int = 0  # the sampler's seed, and the held-out slices' seed
    concurrency: int | None = Field(None, gt=0)  # at most this many trials at once (default: as resources allow)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)  # of a task's training rows when it has no validation split

    def param_space(self, method: str) -> dict[str, Any]:
        grid = self.scheduler.kind == "grid"
        space = {key: p.to_tune(grid) for key, p in self.space.items()}
        methods = self.methods or [method]
        from ray import tune

        return {"method": tune.grid_search(methods) if len(methods) > 1 else methods[0], **space}

    def samples(self) -> int:
        return 1 if self.scheduler.kind == "grid" else self.num_samples

    def trials(self) -> int:
        """How many trials the search runs: samples x the grid's points (x the methods, when several)."""
        grid = self.scheduler.kind == "grid"
        points = math.prod(len(p.grid or p.choice) for p in self.space.values() if p.grid or (grid and p.choice))
        return self.samples() * points * len(self.methods or [None])


def _errors(where: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            msg += f" (known: {', '.join(Search.model_fields)})"
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)


def load_search(path: str | Path) -> Search:
    """Read and validate a search YAML (``yaml.safe_load``); any problem is one SpecError naming file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the search file ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the search must be a mapping (space, objective, scheduler, ...)")
    try:
        search = Search.model_validate(data)
    except ValidationError as e:
        raise SpecError(_errors(str(path), e)) from None
    if search.name is None:
        search.name = path.stem
    return search


def check_space(search: Search, stream) -> None:
    """Every method of the search must accept the stream's method_args (its own method only) with the space's keys:
    an unknown key fails here, naming it, before Ray starts."""
    from gorp.methods import build_method

    if search.scheduler.grace_period > len(stream.tasks):
        raise SpecError(
            f"scheduler.grace_period: {search.scheduler.grace_period} stages, but the stream has {len(stream.tasks)}"
        )
    example = {key: p.example() for key, p in search.space.items()}
    for method in search.methods or [stream.method]:
        base = stream.method_args if method == stream.method else {}
        try:
            build_method(method, **(base | example))
        except (TypeError, ValueError) as e:
            raise SpecError(f"search space: method {method!r} does not take these method_args: {e}") from None
