"""Feeding tokenized rows to training: dynamic padding, equal step counts on every rank, and a Ray-free iterator.

Split from :mod:`pipelines.data` (which re-exports these names).
"""

from __future__ import annotations

import logging
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
