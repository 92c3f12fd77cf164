"""Ray Data preprocessing of a stream's task splits: validate, format, tokenize, cache, feed.

    files ──validate_file (records.py: errors named FILE:LINE, or counted + quarantined with on_bad_record: skip)
          ──read_records: ray.data.read_json / read_csv / read_parquet, one per file, tagged with its part number
          ──union──map_batches(encoding.TokenizeBatch, actor pool: a tokenizer per actor, per-part limits)──> token ids
          ──to_arrow_refs──> the driver writes cache_dir/<task>.<split>.<key>/data (Parquet) per part
                             key = file sha256 + tokenizer + template + limits
    train: PreparedSplit.dataset() (the cached rows, materialized) ──get_dataset_shard(name)──> padded batches

Every split missing from the cache goes through **one** Ray Data job (one actor pool, one tokenizer load per actor),
not one job per task: on a small machine a job's fixed cost (executor, actor start-up, tokenizer import) is seconds,
more than tokenizing a few thousand records. A re-run with the same file, tokenizer, template and limits loads the
cached Parquet and tokenizes nothing (``PreparedSplit.cache_hit``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.encoding import PART, PartSpec, TokenizeBatch, load_tokenizer, tokenizer_identity
from pipelines.feeding import MODEL_COLUMNS
from pipelines.records import (
    MAX_RECORD_BYTES,
    TEMPLATE_VERSION,
    BadRecord,
    DataError,
    ValidationReport,
    file_digest,
    format_prompt,
    read_records,
    scan_records,
    validate_file,
)

if TYPE_CHECKING:
    import ray.data

    from pipelines.spec import Task

log = logging.getLogger(__name__)

CACHE_VERSION = "2"  # 2: meta.json lists each Parquet file's size and sha256
QUARANTINE_FILE = "quarantine.jsonl"  # a cache entry's copy of the records its split skipped


# ---------------------------------------------------------------- the tokenized cache


@dataclass(frozen=True)
class PreparedSplit:
    """A tokenized split in the cache: a folder of Parquet files (input_ids, labels, n_prompt_tokens, truncated)."""

    task: str
    split: str
    source: str  # the data file (a local path or a URI)
    digest: str  # its sha256 (file_digest)
    path: Path  # the folder of Parquet files
    num_rows: int
    num_bad: int  # records skipped with on_bad_record: skip, listed in `quarantine`
    num_truncated: int  # prompts cut from the left to max_source_tokens
    max_length: int  # longest input_ids (tokens)
    mean_length: float
    pad_token_id: int
    quarantine: Path | None
    cache_hit: bool

    def dataset(self, columns: Sequence[str] = MODEL_COLUMNS) -> ray.data.Dataset:
        """The tokenized rows as a materialized Ray Dataset, numeric columns only (ready for a Train worker's shard).

        The driver reads the cached Parquet and puts it in the object store (``ray.data.from_arrow``): no Ray job,
        nothing for Train workers that hold every CPU to wait for (an unmaterialized read on 2 CPUs with 2 one-CPU
        workers hangs the fit with "Cluster resources are not enough to run any task"), and on a cluster the rows come
        from the driver's cache folder whichever node reads them. Tokenized fine-tuning data is small."""
        import ray.data

        return ray.data.from_arrow(pq.read_table(str(self.path), columns=list(columns)))


_STORED = ("source", "digest", "num_rows", "num_bad", "num_truncated", "max_length", "mean_length", "pad_token_id")


def _load_entry(entry: Path, task: str, split: str, cache_hit: bool) -> PreparedSplit:
    meta = json.loads((entry / "meta.json").read_text())
    quarantine = entry / QUARANTINE_FILE
    return PreparedSplit(
        task=task,
        split=split,
        path=entry / "data",
        cache_hit=cache_hit,
        quarantine=quarantine if meta["num_bad"] else None,
        **{k: meta[k] for k in _STORED},
    )


def _file_check(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _damage(entry: Path) -> str | None:
    """What is wrong with a cache entry (None when its files match meta.json: sizes, sha256, Parquet row count)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"meta.json unreadable ({e})"
    rows = 0
    for name, want in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_check(path) != want:
            return f"{name} does not match its size/sha256 in meta.json"
        rows += pq.read_metadata(path).num_rows
    if rows != meta.get("num_rows"):
        return f"{rows} rows where meta.json says {meta.get('num_rows')}"
    return None


def _discard_if_damaged(entry: Path) -> None:
    """A damaged cache entry (a truncated Parquet file, a missing one) is moved aside and re-tokenized."""
    if not (entry / "meta.json").is_file():
        return
    damage = _damage(entry)
    if damage is None:
        return
    log.warning("tokenized cache entry %s is damaged (%s): re-tokenizing it", entry, damage)
    aside = entry.with_name(f"{entry.name}.damaged-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:  # a twin process moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


@dataclass
class _Miss:
    """A split that is not in the cache yet: built in ``tmp``, renamed to ``entry`` when complete."""

    task: Task
    source: str
    digest: str
    entry: Path
    tmp: Path
    key: dict[str, Any]
    quarantine: Path  # where skipped records go: <quarantine_dir>/<task>.<split>.jsonl, or inside ``tmp``
    report: ValidationReport | None = None


def _cache_key(task: Task, digest: str, tokenizer: dict, seq2seq: bool, max_record_bytes: int) -> dict[str, Any]:
    """Everything the tokenized rows depend on: the file's bytes, the tokenizer, the template and the limits."""
    return {
        "digest": digest,
        "tokenizer": tokenizer,
        "template": TEMPLATE_VERSION,
        "cache": CACHE_VERSION,
        "seq2seq": seq2seq,
        "columns": task.columns.model_dump(),
        "labels": task.labels,
        "max_source_tokens": task.max_source_tokens,
        "max_target_tokens": task.max_target_tokens,
        "on_bad_record": task.on_bad_record,
        "max_record_bytes": max_record_bytes,
    }


def prepare_splits(
    requests: Sequence[tuple[Task, str]],
    *,
    tokenizer_path: str | Path,
    cache_dir: str | Path,
    quarantine_dir: str | Path | None = None,
    seq2seq: bool = False,
    trust_remote_code: bool = False,
    num_actors: int = 1,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> list[PreparedSplit]:
    """Validate, tokenize and cache splits ((task, "train" | "validation" | "test") pairs), in order. Cache hits
    tokenize nothing; every miss goes through one Ray Data job. Skipped records (on_bad_record: skip) are copied to
    ``quarantine_dir/<task>.<split>.jsonl``. Nothing enters the cache unless every split of the job succeeded.

    Ray must be up (``ray.init``); ``num_actors`` tokenizer actors run at most (CPUs - 1), so that the read tasks
    keep a CPU (a pool that takes every CPU deadlocks the pipeline).
    """
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    identity = tokenizer_identity(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    entries: list[Path] = []
    misses: list[_Miss] = []
    for task, split in requests:
        source = getattr(task, split, None)
        if split not in ("train", "validation", "test") or source is None:
            raise ValueError(f"task {task.name!r} has no {split!r} split")
        source = str(source)
        if not storage.exists(source):
            raise DataError(f"{source}: file not found (task {task.name!r}, {split} split)")
        digest = file_digest(source)
        key = _cache_key(task, digest, identity, seq2seq, max_record_bytes)
        digest_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        entry = Path(cache_dir) / f"{task.name}.{split}.{digest_key}"
        entries.append(entry)
        if entry not in entries[:-1]:
            _discard_if_damaged(entry)
        if not (entry / "meta.json").is_file() and all(m.entry != entry for m in misses):
            tmp = entry.with_name(f"{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
            # skipped records go straight to the run's quarantine: a file that outlives a failure (no valid record)
            bad = Path(quarantine_dir) / f"{task.name}.{split}.jsonl" if quarantine_dir else tmp / QUARANTINE_FILE
            misses.append(_Miss(task, source, digest, entry, tmp, key, bad))
    hits = [(e / "meta.json").is_file() for e in entries]
    if misses:
        try:
            _build_entries(misses, tokenizer_path, seq2seq, trust_remote_code, num_actors, max_record_bytes, pad)
        finally:
            for m in misses:
                shutil.rmtree(m.tmp, ignore_errors=True)
    out = []
    for (task, split), entry, hit in zip(requests, entries, hits, strict=True):
        prepared = _load_entry(entry, task.name, split, hit)
        if prepared.quarantine is not None and quarantine_dir is not None:
            copy = Path(quarantine_dir) / f"{task.name}.{split}.jsonl"
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(prepared.quarantine, copy)
            prepared = replace(prepared, quarantine=copy)
        if prepared.num_truncated:
            log.warning(
                "%s %s: %d of %d prompts truncated from the left to max_source_tokens=%d",
                task.name,
                split,
                prepared.num_truncated,
                prepared.num_rows,
                task.max_source_tokens,
            )
        log.info(
            "%s %s: %d rows (%d bad), mean length %.1f, max %d, cache %s: %s",
            task.name,
            split,
            prepared.num_rows,
            prepared.num_bad,
            prepared.mean_length,
            prepared.max_length,
            "hit" if hit else "miss",
            entry,
        )
        out.append(prepared)
    return out


def _build_entries(
    misses: list[_Miss],
    tokenizer_path: str | Path,
    seq2seq: bool,
    trust_remote_code: bool,
    num_actors: int,
    max_record_bytes: int,
    pad: int,
) -> None:
    """Validate every missing split (plain Python: errors name FILE:LINE), tokenize them all in one Ray Data job,
    write each one's Parquet + meta.json into its temporary folder, then rename the folders into place (atomic; a
    concurrent twin wins)."""
    datasets = []
    for i, m in enumerate(misses):
        m.tmp.mkdir(parents=True)
        columns, labels = m.task.columns.model_dump(), m.task.labels
        m.report = validate_file(
            m.source,
            columns,
            labels,
            on_bad_record=m.task.on_bad_record,
            quarantine=m.quarantine,
            max_record_bytes=max_record_bytes,
        )
        if m.report.num_bad and m.quarantine != m.tmp / QUARANTINE_FILE:
            shutil.copyfile(m.quarantine, m.tmp / QUARANTINE_FILE)  # the cache entry keeps its own copy
        records, cols = m.source, columns
        if m.report.num_bad:  # Arrow cannot skip a bad line: read a clean copy of the good records instead
            records, cols = m.tmp / "records.jsonl", None
            with open(records, "w", encoding="utf-8") as f:
                for rec in scan_records(m.source, columns, labels, max_record_bytes=max_record_bytes):
                    if not isinstance(rec, BadRecord):
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        datasets.append(read_records(records, cols, tag=(PART, i)))
    parts = {
        i: PartSpec(str(m.source), m.task.labels, m.task.max_source_tokens, m.task.max_target_tokens)
        for i, m in enumerate(misses)
    }
    udf_kwargs = {"tokenizer_path": str(tokenizer_path), "parts": parts, "seq2seq": seq2seq}
    table = _tokenize(datasets, udf_kwargs | {"trust_remote_code": trust_remote_code}, num_actors)
    tags = table.column(PART)
    for i, m in enumerate(misses):
        part = table.filter(pc.equal(tags, i)).drop_columns([PART])  # keeps the file's row order
        if part.num_rows != m.report.num_records:
            raise DataError(
                f"{m.source}: Ray read {part.num_rows} records where validation counted "
                f"{m.report.num_records}; is the file being written to?"
            )
        (m.tmp / "data").mkdir()
        pq.write_table(part, m.tmp / "data" / "part-00000.parquet")
        files = {f"data/{f.name}": _file_check(f) for f in sorted((m.tmp / "data").iterdir())}
        lengths = pc.list_value_length(part["input_ids"])
        meta = {
            "source": str(m.source),
            "digest": m.digest,
            "num_rows": part.num_rows,
            "num_bad": m.report.num_bad,
            "num_truncated": int(pc.sum(part["truncated"]).as_py() or 0),
            "max_length": int(pc.max(lengths).as_py()),
            "mean_length": round(pc.mean(lengths).as_py(), 2),
            "pad_token_id": pad,
            "key": m.key,
            "files": files,
        }
        storage.write_text(m.tmp / "meta.json", json.dumps(meta, indent=1))  # temporary name, then a rename
    for m in misses:  # only now: a failure above leaves no entry behind
        try:
            os.rename(m.tmp, m.entry)
        except OSError:  # the same entry was completed meanwhile (a retry, a twin process): keep that one
            if not (m.entry / "meta.json").is_file():
                raise


def _tokenize(datasets: list[ray.data.Dataset], udf_kwargs: dict, num_actors: int) -> pa.Table:
    """One Ray Data job: the union of the tagged record datasets through a TokenizeBatch actor pool; the rows come
    back to the driver (in order) as one Arrow table."""
    import ray
    import ray.data

    if ray.is_initialized():
        num_actors = max(1, min(num_actors, int(ray.cluster_resources().get("CPU", 2)) - 1))
    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the cache keeps the file's row order: runs are reproducible
    try:
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        refs = ds.map_batches(
            TokenizeBatch,
            fn_constructor_kwargs=udf_kwargs,
            batch_size=256,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            udf_modifying_row_count=False,
        ).to_arrow_refs()
        return pa.concat_tables(ray.get(refs))
    except ray.exceptions.RayError as e:  # Ray Data keeps a UDF's exception only as traceback text: surface ours
        marker = f"{DataError.__module__}.{DataError.__qualname__}: "
        for line in str(e).splitlines():
            if line.startswith(marker):
                raise DataError(line.removeprefix(marker)) from e
        raise
    finally:
        ctx.execution_options.preserve_order = preserve


@dataclass(frozen=True)
class PreparedTask:
    """What a stage needs of one task: the tokenized train split, and the test set as prompts + answers (plain lists,
    fit for ``train_loop_config``), both from the same template."""

    name: str
    split: PreparedSplit  # train
    eval_set: dict[str, Any]  # prompts, answers, metric, labels, max_prompt_tokens
    digests: dict[str, str]  # split -> sha256 of its file (lineage)

    @property
    def train(self) -> ray.data.Dataset:
        return self.split.dataset()

    @property
    def n_train(self) -> int:
        return self.split.num_rows


def load_eval_set(task: Task, quarantine_dir: str | Path, split: str = "test") -> dict[str, Any]:
    """The ``split`` ("test" or "validation") as formatted prompts and answers; bad records per on_bad_record
    (quarantined when skipped). Prompts are to be cut to the task's ``max_source_tokens``, as training cuts them."""
    source = getattr(task, split) if split in ("test", "validation") else None
    if source is None:
        raise ValueError(f"task {task.name!r} has no {split!r} split to evaluate on")
    columns = task.columns.model_dump()
    validate_file(
        source,
        columns,
        task.labels,
        on_bad_record=task.on_bad_record,
        quarantine=Path(quarantine_dir) / f"{task.name}.{split}.jsonl",
    )
    recs = [r for r in scan_records(source, columns, task.labels) if not isinstance(r, BadRecord)]
    return {
        "prompts": [format_prompt(r["instruction"], r["input"], task.labels) for r in recs],
        "answers": [r["output"] for r in recs],
        "metric": task.metric,
        "labels": task.labels,
        "max_prompt_tokens": task.max_source_tokens,
    }


def cap_eval_set(eval_set: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """The eval set with only its first ``cap`` examples (all with None)."""
    return {**eval_set, "prompts": eval_set["prompts"][:cap], "answers": eval_set["answers"][:cap]}


def prepare_stream(
    stream,
    model_dir: str | Path,
    run_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    num_actors: int = 1,
    eval_split: str = "test",
) -> list[PreparedTask]:
    """Every task of a stream, in order: train tokenized with the model's tokenizer (cached under
    ``cache_dir``, default ``run_dir/cache``; the misses of all tasks in one Ray Data job), ``eval_split`` ("test";
    "validation" for a hyperparameter search, which must never see test) as the eval set; skipped records under
    ``run_dir/quarantine``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quarantine = Path(run_dir) / "quarantine"
    splits = prepare_splits(
        [(task, "train") for task in stream.tasks],
        tokenizer_path=model_dir,
        cache_dir=Path(cache_dir or Path(run_dir) / "cache"),
        quarantine_dir=quarantine,
        seq2seq=bool(config.get("is_encoder_decoder", False)),
        trust_remote_code=stream.trust_remote_code,
        num_actors=num_actors,
    )
    out = []
    for task, split in zip(stream.tasks, splits, strict=True):
        digests = {s: split.digest if s == "train" else file_digest(p) for s, p in task.sources().items()}
        out.append(PreparedTask(task.name, split, load_eval_set(task, quarantine, eval_split), digests))
    return out
