"""What a search scores on: each task's validation split, never test.

A task without a validation split gets one held out of its training data: ``round(fraction * n)`` rows (at least 1),
chosen by ``random.Random(f"{seed}:{task}").sample`` over the row indices of its good records, so the same search
file holds out the same rows every time. The search trains on the rest only: both parts are written as JSONL (in the
file's order) under ``<search>/holdout/`` and the search's stream points at them. ``gorp run`` of the best
configuration trains on the whole training file again and reports test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipelines.records import BadRecord, DataError, scan_records


def held_out_indices(n: int, fraction: float, seed: int, task: str) -> set[int]:
    k = min(n - 1, max(1, round(fraction * n)))
    return set(random.Random(f"{seed}:{task}").sample(range(n), k))


def _records(task) -> list[dict]:
    out = []
    for rec in scan_records(task.train, task.columns.model_dump(), task.labels):
        if isinstance(rec, BadRecord):
            if task.on_bad_record == "error":
                raise DataError(f"{rec} (task {task.name!r})")
            continue
        out.append(rec)
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def validation_stream(stream, out_dir: str | Path, fraction: float, seed: int):
    """The stream a search trains and scores on, and one line per task saying what it is scored on."""
    from pipelines.spec import parse_stream

    out_dir = Path(out_dir) / "holdout"
    data = stream.model_dump(mode="json")
    notes = []
    for entry, task in zip(data["tasks"], stream.tasks, strict=True):
        if task.validation is not None:
            notes.append(f"{task.name}: scored on its validation split ({task.validation})")
            continue
        rows = _records(task)
        held = held_out_indices(len(rows), fraction, seed, task.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        entry["train"] = _write(out_dir / f"{task.name}.train.jsonl", [r for i, r in enumerate(rows) if i not in held])
        entry["validation"] = _write(out_dir / f"{task.name}.validation.jsonl", [rows[i] for i in sorted(held)])
        entry["columns"] = {"instruction": "instruction", "input": "input", "output": "output"}
        notes.append(
            f"{task.name}: no validation split; {len(held)} of {len(rows)} training rows held out "
            f"(seed {seed}, fraction {fraction}) and never trained on in this search"
        )
    return parse_stream(data, where=str(stream.source or "stream")), notes
