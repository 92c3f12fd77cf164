"""Text to token ids, the same for training and evaluation: the label-only loss mask, left truncation of prompts, the
tokenizer's identity (part of the cache key), and the Ray Data UDF that tokenizes records on an actor pool.

Split from :mod:`pipelines.data` (which re-exports these names).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from pipelines.feeding import IGNORE_INDEX
from pipelines.records import FIELDS, DataError, format_prompt, format_target

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text (e.g. ([bos], []) for LLaMA, ([], [eos]) for T5)."""
    bare = tokenizer("answer", add_special_tokens=False)["input_ids"]
    full = tokenizer("answer", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


class Prompts(NamedTuple):
    ids: list[list[int]]  # special tokens around the (cut) prompt
    lengths: list[int]  # each prompt's length before cutting (no special tokens)
    cut: list[bool]  # whether it was cut


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_source_tokens: int | None, seq2seq: bool) -> Prompts:
    """Prompts to source ids exactly as training and evaluation feed them: the tokenizer's special tokens around, the
    prompt cut from the left to fit ``max_source_tokens`` (special tokens included; None: no limit). A causal LM's own
    suffix (rare) is left out: the answer follows the prompt."""
    prefix, suffix = special_tokens_around(tokenizer)
    suffix = suffix if seq2seq else []
    budget = None if max_source_tokens is None else max_source_tokens - len(prefix) - len(suffix)
    if budget is not None and budget < 1:
        raise ValueError(f"max_source_tokens={max_source_tokens} leaves no room beside the special tokens")
    bodies = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if len(prompts) else []
    cut = [budget is not None and len(b) > budget for b in bodies]
    ids = [prefix + (list(b)[-budget:] if c else list(b)) + suffix for b, c in zip(bodies, cut, strict=True)]
    return Prompts(ids, [len(b) for b in bodies], cut)


class Encoder:
    """Prompts and answers to token ids with a label-only loss mask, under fixed length limits.

    The prompt is truncated from the left (the end, "Answer:", stays next to the answer); the answer is never
    truncated: an answer over ``max_target_tokens`` (EOS included) raises ValueError. Limits include special tokens.
    """

    def __init__(self, tokenizer, *, max_source_tokens: int, max_target_tokens: int, seq2seq: bool = False):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; set tokenizer.eos_token")
        self.tokenizer, self.seq2seq, self.eos = tokenizer, seq2seq, tokenizer.eos_token_id
        self.max_source_tokens, self.max_target_tokens = max_source_tokens, max_target_tokens
        encode_prompts(tokenizer, [], max_source_tokens=max_source_tokens, seq2seq=seq2seq)  # the limit fits

    def prompts(self, prompts: Sequence[str]) -> Prompts:
        """Source ids (what generation and rank classification feed the model), lengths, and which were cut."""
        return encode_prompts(self.tokenizer, prompts, max_source_tokens=self.max_source_tokens, seq2seq=self.seq2seq)

    def targets(self, outputs: Sequence[str]) -> list[list[int]]:
        texts = [format_target(o, seq2seq=self.seq2seq) for o in outputs]
        ids = [t + [self.eos] for t in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for out, t in zip(outputs, ids, strict=True):
            if len(t) > self.max_target_tokens:
                raise ValueError(
                    f"answer {out[:60]!r} is {len(t)} tokens with EOS, over max_target_tokens="
                    f"{self.max_target_tokens}; raise max_target_tokens (answers are never truncated)"
                )
        return ids

    def examples(self, prompts: Sequence[str], outputs: Sequence[str]) -> dict[str, list]:
        """Causal: input_ids = source + answer + EOS, labels = -100 on the source. Seq2seq: labels = answer + EOS."""
        sources, raw_lengths, cut = self.prompts(prompts)
        targets = self.targets(outputs)
        if self.seq2seq:
            input_ids, labels = sources, targets
        else:
            input_ids = [s + t for s, t in zip(sources, targets, strict=True)]
            labels = [[IGNORE_INDEX] * len(s) + t for s, t in zip(sources, targets, strict=True)]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "n_prompt_tokens": raw_lengths,
            "truncated": cut,
        }


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """A tokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What makes two tokenizers give the same ids: name, class, size, special ids and a hash of its files (or, for
    a tokenizer not loaded from a folder, of its serialized vocabulary and rules)."""
    h, folder = hashlib.sha256(), Path(str(tokenizer.name_or_path))
    files = sorted(p for p in folder.iterdir() if p.name in TOKENIZER_FILES) if folder.is_dir() else []
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    if not files and hasattr(tokenizer, "backend_tokenizer"):
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "hash": h.hexdigest(),
    }


PART = "_part"  # the column that tags each record with its split's index in a tokenization job


@dataclass(frozen=True)
class PartSpec:
    """What tokenizing one split needs besides the tokenizer (one per part of a job)."""

    source: str  # the data file, for error messages
    labels: list[str] | None
    max_source_tokens: int
    max_target_tokens: int


class TokenizeBatch:
    """``map_batches`` UDF over canonical records tagged with ``PART``; a class, so each actor of the pool loads the
    tokenizer once. Each part has its own labels and limits; a batch may span parts (small files are bundled)."""

    def __init__(
        self,
        tokenizer_path: str,
        *,
        parts: dict[int, PartSpec],
        seq2seq: bool = False,
        trust_remote_code: bool = False,
    ):
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.parts = parts
        self.encoders = {
            i: Encoder(
                tokenizer, max_source_tokens=p.max_source_tokens, max_target_tokens=p.max_target_tokens, seq2seq=seq2seq
            )
            for i, p in parts.items()
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        tags = batch.column(PART).to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(tags)) + 1).tolist(), len(tags)]  # runs of one part, in row order
        ex: dict[str, list] = {"input_ids": [], "labels": [], "n_prompt_tokens": [], "truncated": []}
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            part = self.parts[int(tags[a])]
            rows = batch.slice(a, b - a)
            instructions, inputs, outputs = (rows.column(c).to_pylist() for c in FIELDS)
            prompts = [format_prompt(i, x, part.labels) for i, x in zip(instructions, inputs, strict=True)]
            try:
                run = self.encoders[int(tags[a])].examples(prompts, outputs)
            except ValueError as e:
                raise DataError(f"{part.source}: {e}") from None
            for k, v in ex.items():
                v.extend(run[k])
        ids = pa.list_(pa.int32())
        return pa.table(
            {
                "input_ids": pa.array(ex["input_ids"], ids),
                "labels": pa.array(ex["labels"], ids),
                "n_prompt_tokens": pa.array(ex["n_prompt_tokens"], pa.int32()),
                "truncated": pa.array(ex["truncated"], pa.bool_()),
                PART: batch.column(PART),
            }
        )
