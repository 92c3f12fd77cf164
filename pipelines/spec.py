"""The stream spec: one YAML file names the model, the method, the ordered tasks, the training and where it runs.

    stream = load_stream("examples/quickstart.yaml")   # structure and types; SpecError("FILE: key.path: problem")
    plan = check_stream(stream, tokenizer)             # files, records, columns, labels, token lengths; no training
    rich.print(plan)

Every model forbids unknown keys, so a typo is an error naming the key. Relative data and model paths are resolved
against the YAML file's folder (the stream travels with its data); ``run_dir`` is relative to the working directory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SPLITS = ("train", "validation", "test")

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]  # usable in file, run and model names
Text = Annotated[str, Field(min_length=1)]


class SpecError(ValueError):
    """The stream file is invalid; the message names the file and the key path, e.g. ``s.yaml: tasks.1.labels: ...``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve(value: str | Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    return Path(base, path) if base is not None and not path.is_absolute() else path


def _location(value: str, info: ValidationInfo) -> str:
    """A URI as it is; a local path resolved against the YAML's folder."""
    from pipelines.storage import is_uri

    return value if is_uri(value) else str(_resolve(value, info))


class Columns(_Strict):
    """Which column of the data file holds each field; null: the file has no such column (read as "")."""

    instruction: Text | None = "instruction"
    input: Text | None = "input"
    output: Text = "output"


class Task(_Strict):
    name: Name
    train: str  # a local path (relative to the YAML file) or a URI (s3://, gs://, ...)
    validation: str | None = None
    test: str
    columns: Columns = Columns()
    labels: list[Text] | None = Field(None, min_length=2)  # the options of a classification task
    metric: Literal["exact_match", "rank_classification"] = "exact_match"
    max_source_tokens: int = Field(256, gt=0)  # prompt budget; longer prompts lose their beginning
    max_target_tokens: int = Field(16, gt=0)  # answer + EOS; a longer answer is an error, never truncated
    on_bad_record: Literal["error", "skip"] = "error"

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("train", "validation", "test")
    @classmethod
    def _data_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        from pipelines.records import suffix

        if value is None:
            return None
        if suffix(value) not in DATA_SUFFIXES:
            raise ValueError(f"unsupported data file {str(value)!r}: use one of {', '.join(DATA_SUFFIXES)}")
        return _location(value, info)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"duplicate label(s): {sorted(k for k, n in Counter(value).items() if n > 1)}")
        return value

    @field_validator("metric")
    @classmethod
    def _metric_needs_labels(cls, value: str, info: ValidationInfo) -> str:
        if value == "rank_classification" and not info.data.get("labels"):
            raise ValueError("rank_classification scores the label options: give the task its labels")
        return value

    def sources(self) -> dict[str, str]:
        """The task's data files by split, the absent validation split left out."""
        return {s: getattr(self, s) for s in SPLITS if getattr(self, s) is not None}


class Training(_Strict):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)  # global batch (all workers together)
    eval_batch_size: int = Field(16, gt=0)
    max_eval_examples: int | None = Field(None, gt=0)  # score the first N test examples of each task; null: all
    max_steps: int | None = Field(None, gt=0)  # steps of every stage, cycling over the data; null: epochs x rows/batch
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm; null: no clipping
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between checkpoints; 0: only at the end of a stage
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the last checkpoint (Ray FailureConfig)
    seed: int = 0  # adapter initialization, and the order of the training rows
    shuffle: bool = True  # each epoch visits a task's rows in a new permutation drawn from (seed, stage, epoch)
    # bf16: matmuls in bfloat16 over float32 master weights (FSDP2 MixedPrecisionPolicy with float32 gradient
    # reduction; autocast on one worker); projections, task memory and Adam's moments stay float32 (gorp.precision)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False  # recompute each decoder block in the backward: less memory, ~1/3 more time


class Scaling(_Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    fsdp: bool = False  # FSDP2 fully_shard per block; off: every worker holds the whole model (DDP-style)


class MLflowSettings(_Strict):
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str | None = None  # null: the stream's name
    # the promotion gate: `champion` moves to a new version when, on the tasks the champion knows, it loses at most
    # max_forgetting accuracy on average, and it reaches new_task_floor on its own new task
    max_forgetting: float = Field(0.05, ge=0, le=1)
    new_task_floor: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "aa_tolerance" in data:
            raise ValueError(
                "aa_tolerance was replaced by max_forgetting (the promotion gate now compares like with like: the "
                "mean accuracy a new version may lose on the tasks the champion knows, e.g. max_forgetting: 0.05)"
            )
        return data


class Stream(_Strict):
    name: Name  # also the registered model's name
    model: str  # a local folder (config + safetensors + tokenizer) or a demo name
    trust_remote_code: bool = False
    method: str  # one of gorp.methods.METHODS
    method_args: dict[str, Any] = {}  # hyperparameters, passed to the method as keyword arguments
    tasks: list[Task] = Field(min_length=1)
    training: Training = Training()
    scaling: Scaling = Scaling()
    run_dir: Path = Path("runs")
    mlflow: MLflowSettings = MLflowSettings()
    _source: Path | None = PrivateAttr(None)  # the YAML file, for messages

    @field_validator("model")
    @classmethod
    def _model(cls, value: str, info: ValidationInfo) -> str:
        from pipelines.demo_model import DEMO_MODELS, HF_REPO_ID

        if value.startswith("demo:"):
            if value not in DEMO_MODELS:
                raise ValueError(f"unknown demo model {value!r}; known: {', '.join(DEMO_MODELS)}")
            return value
        path = _location(value, info)
        if not Path(path).exists() and HF_REPO_ID.match(value):
            return value  # a Hugging Face model id, looked up in the local cache when the run starts
        return path

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from gorp.methods import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; choose from {', '.join(METHODS)}")
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[Task]) -> list[Task]:
        seen: dict[str, int] = {}
        for i, task in enumerate(tasks):
            if task.name in seen:
                raise ValueError(f"duplicate task name {task.name!r} (tasks {seen[task.name]} and {i})")
            seen[task.name] = i
        return tasks

    @property
    def source(self) -> Path | None:
        return self._source


def _format_errors(where: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("missing", "extra_forbidden", "value_error") and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r:.60})"
        if isinstance(e["input"], bool) and e["type"] == "string_type":
            msg += "; YAML reads a bare yes/no/on/off as a boolean: quote it"
        if e["type"] == "extra_forbidden":
            known = _known_keys(e["loc"])
            msg = "unknown key" + (f" (known: {', '.join(known)})" if known else "")
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)


def _known_keys(loc: tuple) -> list[str]:
    model: Any = Stream
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        model = getattr(info, "annotation", None) if info else None
        model = next((a for a in getattr(model, "__args__", (model,)) if isinstance(a, type)), model)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def parse_stream(data: Any, *, base_dir: str | Path | None = None, where: str = "stream") -> Stream:
    """A Stream from an already-loaded mapping (e.g. a Tune trial's config); errors as in load_stream."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the stream must be a mapping of keys (name, model, method, tasks, ...)")
    try:
        return Stream.model_validate(data, context={"base_dir": Path(base_dir) if base_dir else None})
    except ValidationError as e:
        raise SpecError(_format_errors(where, e)) from None


def load_stream(path: str | Path) -> Stream:
    """Read and validate a stream YAML (``yaml.safe_load``); any problem is one SpecError naming file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the stream file ({e.__class__.__name__}: {e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    stream = parse_stream(data, base_dir=path.resolve().parent, where=str(path))
    stream._source = path
    return stream


# ---------------------------------------------------------------- check_stream: everything short of training


@dataclass
class TaskPlan:
    name: str
    counts: dict[str, int]  # good records per split
    num_bad: int  # records skipped (on_bad_record: skip)
    labels: list[str] | None
    label_counts: dict[str, int]  # train split
    prompt_tokens: tuple[float, int] | None = None  # (mean, max) of the train prompts, with a tokenizer
    num_over: int = 0  # train prompts over max_source_tokens (they will be truncated from the left)
    max_source_tokens: int = 0


@dataclass
class Plan:
    stream: Stream
    tasks: list[TaskPlan] = field(default_factory=list)

    def __rich__(self):
        from rich import box
        from rich.table import Table

        s = self.stream
        table = Table(
            box=box.SIMPLE_HEAD,
            title=f"{s.name}: {s.method} on {s.model}, {len(s.tasks)} task(s), {s.scaling.num_workers} worker(s)",
            caption="train/val/test: records; bad: skipped; prompt: tokens, mean / max",
        )
        # one line a task at 80 columns: the label list is cut (with an ellipsis) before anything wraps
        for col in ("task", "train", "val", "test", "bad", "prompt"):
            table.add_column(col, justify="left" if col == "task" else "right", no_wrap=True, min_width=len(col))
        table.add_column("labels", no_wrap=True, overflow="ellipsis", max_width=24)
        for t in self.tasks:
            labels = "-" if not t.labels else f"{len(t.labels)}: " + ", ".join(t.labels)
            tokens = "-" if t.prompt_tokens is None else f"{t.prompt_tokens[0]:.0f} / {t.prompt_tokens[1]}"
            if t.num_over:
                tokens += f" ({t.num_over} over {t.max_source_tokens})"
            table.add_row(t.name, *(str(t.counts.get(k, "-")) for k in SPLITS), str(t.num_bad), tokens, labels)
        return table


def check_stream(stream: Stream, tokenizer=None, *, max_prompts: int = 2000) -> Plan:
    """Check what can be checked without training: the model folder, every data file and record (columns, types,
    labels among the options), and, with a tokenizer, the train prompts' token lengths (the first ``max_prompts``).

    Raises SpecError for a missing file (naming the key) and DataError for a bad record with on_bad_record: error
    (naming FILE:LINE); with on_bad_record: skip the bad records are counted (the run quarantines them)."""
    from pipelines import storage
    from pipelines.records import BadRecord, DataError, format_prompt, scan_records

    where = str(stream.source or "stream")
    from pipelines.demo_model import HF_REPO_ID
    from pipelines.storage import is_uri

    model = stream.model
    if not (model.startswith("demo:") or is_uri(model) or Path(model).is_dir() or HF_REPO_ID.match(model)):
        raise SpecError(f"{where}: model: folder not found: {model}")
    plan = Plan(stream)
    for i, task in enumerate(stream.tasks):
        tp = TaskPlan(task.name, {}, 0, task.labels, {}, max_source_tokens=task.max_source_tokens)
        prompts: list[str] = []
        for split, path in task.sources().items():
            if not storage.exists(path):
                raise SpecError(f"{where}: tasks.{i}.{split}: file not found: {path}")
            n = 0
            for rec in scan_records(path, task.columns.model_dump(), task.labels):
                if isinstance(rec, BadRecord):
                    if task.on_bad_record == "error":
                        raise DataError(f"{rec} (task {task.name!r}; on_bad_record: skip would quarantine it)")
                    tp.num_bad += 1
                    continue
                n += 1
                if split == "train":
                    tp.label_counts[rec["output"]] = tp.label_counts.get(rec["output"], 0) + 1
                    if tokenizer is not None and len(prompts) < max_prompts:
                        prompts.append(format_prompt(rec["instruction"], rec["input"], task.labels))
            if n == 0:
                raise DataError(f"{path}: no valid record (task {task.name!r}, {split})")
            tp.counts[split] = n
        if prompts:
            lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
            tp.prompt_tokens = (sum(lengths) / len(lengths), max(lengths))
            tp.num_over = sum(n > task.max_source_tokens for n in lengths)
        plan.tasks.append(tp)
    return plan
