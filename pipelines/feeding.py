"""Feeding tokenized rows to training: dynamic padding, equal step counts on every rank, and a Ray-free iterator.

Split from :mod:`pipelines.data` (which re-exports these names).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

log = logging.getLogger("pipelines.data")

MODEL_COLUMNS = ("input_ids", "labels")
IGNORE_INDEX = -100  # the label of prompt and padding positions: no loss
T = TypeVar("T")


# ---------------------------------------------------------------- feeding


def _pad(column: pa.ChunkedArray | pa.Array, value: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A list<int> column -> (padded (B, L) int64, lengths (B,)); L = longest row rounded up to `multiple`."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    width = -(-max(int(lengths.max(initial=1)), 1) // multiple) * multiple
    out = np.full((len(col), width), value, dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = col.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(out), torch.from_numpy(lengths)


class PadCollate(ArrowBatchCollateFn):
    """Arrow rows of token ids -> dict of tensors: input_ids (padded with the pad id), attention_mask, labels (-100).

    Dynamic padding: a batch is as wide as its longest row (rounded up to ``pad_to_multiple_of``), not as wide as
    max_source_tokens + max_target_tokens; on CPU that is most of the step time for short classification prompts.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        input_ids, lengths = _pad(batch.column("input_ids"), self.pad_token_id, self.multiple)  # (B, L), (B,)
        out = {"input_ids": input_ids, "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()}
        if "labels" in batch.column_names:  # causal: (B, L) like input_ids; seq2seq: (B, L_target)
            out["labels"] = _pad(batch.column("labels"), IGNORE_INDEX, self.multiple)[0]
        return out


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch, the same on every rank: global rows // (batch_size * world_size)."""
    steps = num_rows // (batch_size * world_size)
    if steps < 1:
        raise ValueError(
            f"{num_rows} rows are fewer than one global batch ({batch_size} x {world_size} workers): "
            "lower training.batch_size or scaling.num_workers"
        )
    return steps


def take_steps(batches: Iterable[T], steps: int) -> Iterator[T]:
    """Exactly ``steps`` batches. Batches past ``steps`` are read and dropped (a Ray streaming split ends its epoch
    only when every rank has read its shard); a shard that runs short repeats its last batch, with a warning, so that
    every rank makes the same number of collective calls (ray.train.report is a barrier). Iterate to the end."""
    n, last = 0, None
    for batch in batches:
        if n < steps:
            n, last = n + 1, batch
            yield batch
    if n < steps:
        if last is None:
            raise RuntimeError("this rank's data shard is empty")
        log.warning("data shard ran short: %d of %d batches; repeating the last batch", n, steps)
        for _ in range(steps - n):
            yield last


def epoch_batches(
    shard,
    *,
    steps: int,
    batch_size: int,
    pad_token_id: int,
    seed: int | None = None,
    local_shuffle_buffer_size: int | None = None,
    prefetch_batches: int = 1,
) -> Iterator[dict]:
    """One epoch of a Ray Data shard (a ``DataIterator``) as exactly ``steps`` padded batches of ``batch_size``."""
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=PadCollate(pad_token_id),
        drop_last=True,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=seed,
        prefetch_batches=prefetch_batches,
    )
    return take_steps(batches, steps)


def train_batches(
    name: str = "train", *, num_rows: int, global_batch_size: int, pad_token_id: int, **kwargs
) -> Iterator[dict]:
    """Inside a Ray Train worker: one epoch of ``get_dataset_shard(name)`` in batches of global_batch_size //
    world_size rows (``training.batch_size`` is global); ``num_rows`` is the global row count
    (``PreparedSplit.num_rows``). Every rank gets num_rows // global_batch_size batches."""
    import ray.train

    world_size = ray.train.get_context().get_world_size()
    if global_batch_size % world_size:
        raise ValueError(f"batch_size {global_batch_size} does not split evenly over {world_size} workers")
    batch_size = global_batch_size // world_size
    steps = steps_per_epoch(num_rows, batch_size, world_size)
    return epoch_batches(
        ray.train.get_dataset_shard(name), steps=steps, batch_size=batch_size, pad_token_id=pad_token_id, **kwargs
    )


def iter_parquet_batches(
    path: str | Path, *, batch_size: int, pad_token_id: int, seed: int | None = None, drop_last: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """The same batches without Ray, for one process and for tests: shuffled by ``seed`` (None: file order)."""
    table = pq.read_table(str(path), columns=list(MODEL_COLUMNS))
    order = np.random.default_rng(seed).permutation(table.num_rows) if seed is not None else np.arange(table.num_rows)
    stop = table.num_rows - table.num_rows % batch_size if drop_last else table.num_rows
    collate = PadCollate(pad_token_id)
    for start in range(0, stop, batch_size):
        yield collate(table.take(order[start : start + batch_size]))
