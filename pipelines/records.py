"""Records of a data file (JSONL, JSON, CSV, Parquet): validation, and the prompt template. Ray only in read_records.

Every record is checked in plain Python before Ray reads the file, because Arrow's readers stop at the first malformed
line without naming it. A problem names FILE:LINE (JSONL, CSV) or "FILE: row N" (Parquet, JSON arrays): invalid JSON,
non-UTF-8 bytes, a missing / null / non-string field, an empty output, a label not among the options, a record over
the size limit. A problem with the whole file (missing, empty, a mapped column absent from the header or schema, a
non-string Parquet column) is a DataError whatever ``on_bad_record`` says.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
MAX_RECORD_BYTES = 1 << 20  # a record (JSONL line) above 1 MiB is rejected
TEMPLATE_VERSION = "v1"  # bump whenever format_prompt / format_target change: it is part of the cache key


class DataError(ValueError):
    """A data file or record is unusable; the message names the file (and line or row) and the problem."""


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int  # line number (JSONL, CSV) or 1-based row number (Parquet, JSON array)
    reason: str
    raw: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}: row {self.line}"
        return f"{where}: {self.reason}"


class _Bad(str):
    """A reason, yielded by a format scanner in place of a parsed record."""


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes (a local path or a URI): the data identity in lineage and cache keys."""
    with storage.open_input(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def suffix(path: str | Path) -> str:
    """The lower-case suffix of a path or a URI (``.jsonl``)."""
    return PurePosixPath(urlparse(str(path)).path if storage.is_uri(path) else str(path)).suffix.lower()


# ---------------------------------------------------------------- validation


def scan_records(
    path: str | Path,
    columns: Mapping[str, str | None] | None = None,
    labels: Sequence[str] | None = None,
    *,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[dict[str, str] | BadRecord]:
    """Every record of a data file, in order: a dict(instruction, input, output) of strings, or a BadRecord.

    ``columns`` maps each canonical field to the file's column (None: the field is absent, read as ""). Problems of
    the whole file (missing, empty, unreadable, a mapped column absent) raise DataError instead.
    """
    path = str(path)
    cols = dict(zip(FIELDS, FIELDS, strict=True)) | dict(columns or {})
    scanners = {".jsonl": _scan_jsonl, ".json": _scan_json, ".csv": _scan_csv, ".parquet": _scan_parquet}
    if suffix(path) not in scanners:
        raise DataError(f"{path}: unsupported file type {suffix(path)!r} (use .jsonl, .json, .parquet or .csv)")
    if not storage.exists(path):
        raise DataError(f"{path}: file not found")
    if storage.size(path) == 0:
        raise DataError(f"{path}: empty file (no records)")
    n = 0
    for unit, loc, raw, obj in scanners[suffix(path)](path, [c for c in cols.values() if c]):
        n += 1
        size = len(raw.encode("utf-8", "replace"))
        if size > max_record_bytes and not isinstance(obj, _Bad):
            obj, raw = _Bad(f"record of {size} bytes is over the limit of {max_record_bytes}"), raw[:1000] + " ...[cut]"
        rec = obj if isinstance(obj, _Bad) else _check_record(obj, cols, labels)
        yield BadRecord(str(path), loc, str(rec), raw, unit) if isinstance(rec, _Bad) else rec
    if n == 0:
        raise DataError(f"{path}: empty file (no records)")


def _check_record(obj: Any, cols: Mapping[str, str | None], labels: Sequence[str] | None) -> dict[str, str] | _Bad:
    if not isinstance(obj, dict):
        return _Bad(f"expected an object with fields {[c for c in cols.values() if c]}, got {type(obj).__name__}")
    rec = {}
    for name, col in cols.items():
        if col is None:
            rec[name] = ""
            continue
        field = repr(col) if col == name else f"{col!r} (the {name})"
        if col not in obj:
            return _Bad(f"missing field {field}")
        value = obj[col]
        if not isinstance(value, str):
            kind = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
            return _Bad(f"field {field} must be a string, got {kind}")
        rec[name] = value
    if not rec["output"].strip():
        return _Bad(f"empty output (field {cols['output']!r})")
    if labels is not None and rec["output"] not in labels:
        return _Bad(f"label {rec['output']!r} is not among the options {list(labels)}")
    return rec


def _scan_jsonl(path: str, _columns: list[str]) -> Iterator[tuple[str, int, str, Any]]:
    with storage.open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad = _Bad(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                yield "line", lineno, raw.decode("utf-8", "backslashreplace").rstrip("\r\n"), bad
                continue
            if not text.strip():
                continue  # a blank line is not a record
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                obj = _Bad(f"invalid JSON: {e.msg} (column {e.colno})")
            yield "line", lineno, text, obj


def _decode_whole(path: str) -> str:
    data = storage.read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x})") from None


def _scan_json(path: str, columns: list[str]) -> Iterator[tuple[str, int, str, Any]]:
    text = _decode_whole(path)
    if not text.lstrip().startswith("["):
        yield from _scan_jsonl(path, columns)  # JSON lines in a .json file
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    for row, obj in enumerate(records, 1):
        yield "row", row, json.dumps(obj, ensure_ascii=False), obj


def _scan_csv(path: str, columns: list[str]) -> Iterator[tuple[str, int, str, Any]]:
    lines = _decode_whole(path).splitlines(keepends=True)
    reader = csv.reader(io.StringIO("".join(lines), newline=""))
    header = next(reader, None) or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing} in the header {header}")
    start = reader.line_num + 1
    for row in reader:
        loc, start = start, reader.line_num + 1
        raw = "".join(lines[loc - 1 : reader.line_num]).rstrip("\r\n")
        if not row:
            continue
        if len(row) != len(header):
            yield "line", loc, raw, _Bad(f"{len(row)} fields where the header has {len(header)}")
        else:
            yield "line", loc, raw, dict(zip(header, row, strict=True))


def _scan_parquet(path: str, columns: list[str]) -> Iterator[tuple[str, int, str, Any]]:
    try:
        pf = pq.ParquetFile(storage.open_input(path))
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    for col in columns:
        if col not in schema.names:
            raise DataError(f"{path}: missing column {col!r} (columns: {schema.names})")
        if not (pa.types.is_string(schema.field(col).type) or pa.types.is_large_string(schema.field(col).type)):
            raise DataError(f"{path}: column {col!r} has type {schema.field(col).type}, expected string")
    row = 0
    for batch in pf.iter_batches(columns=list(dict.fromkeys(columns))):
        for obj in batch.to_pylist():
            row += 1
            yield "row", row, json.dumps(obj, ensure_ascii=False), obj


@dataclass(frozen=True)
class ValidationReport:
    path: str  # a local path or a URI
    num_records: int  # good records
    num_bad: int
    quarantine: Path | None  # JSONL of the bad records (file, line, unit, reason, raw), when any were skipped


def validate_file(
    path: str | Path,
    columns: Mapping[str, str | None] | None = None,
    labels: Sequence[str] | None = None,
    *,
    on_bad_record: str = "error",
    quarantine: str | Path | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> ValidationReport:
    """Check every record. ``error``: raise DataError at the first bad one. ``skip``: count them and write them to
    the ``quarantine`` JSONL (required then, so nothing is dropped silently); raise if no good record is left."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if on_bad_record == "skip" and quarantine is None:
        raise ValueError("on_bad_record='skip' needs a quarantine file for the records it skips")
    good, bad = 0, []
    for rec in scan_records(path, columns, labels, max_record_bytes=max_record_bytes):
        if isinstance(rec, BadRecord):
            if on_bad_record == "error":
                raise DataError(f"{rec} (set on_bad_record: skip to quarantine bad records instead)")
            bad.append(rec)
        else:
            good += 1
    if bad:
        quarantine = Path(quarantine)
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        with open(quarantine, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(asdict(b), ensure_ascii=False) + "\n" for b in bad)
        log.warning("%s: skipped %d bad record(s), first: %s; all in %s", path, len(bad), bad[0], quarantine)
    if good == 0:  # the first bad record here, all of them in the quarantine file (kept: the caller's path)
        raise DataError(f"{path}: no valid record: {len(bad)} bad, the first {bad[0]}; all in {quarantine}")
    return ValidationReport(str(path), good, len(bad), Path(quarantine) if bad else None)


def read_records(
    path: str | Path, columns: Mapping[str, str | None] | None = None, *, tag: tuple[str, int] | None = None
) -> ray.data.Dataset:
    """A validated file as a Ray Dataset of string columns instruction, input, output (Arrow readers, parallel).
    ``tag=(name, value)`` adds an int32 column ``name`` holding ``value`` on every row (which file a row came from,
    once several files are in one union)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import ray.data

    path, cols = str(path), dict(zip(FIELDS, FIELDS, strict=True)) | dict(columns or {})
    sources = list(dict.fromkeys(c for c in cols.values() if c))
    kind = suffix(path)
    if kind in (".jsonl", ".json"):  # explicit schema: mapped fields as strings, any other field ignored
        schema = pa.schema([(c, pa.string()) for c in sources])
        opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        ds = ray.data.read_json(str(path), parse_options=opts)
    elif kind == ".csv":
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in sources}, include_columns=sources)
        ds = ray.data.read_csv(
            str(path), convert_options=convert, parse_options=pacsv.ParseOptions(newlines_in_values=True)
        )
    else:
        ds = ray.data.read_parquet(str(path)).select_columns(sources)

    def canonical(batch: pa.Table) -> pa.Table:
        empty = pa.array([""] * batch.num_rows, pa.string())
        out = {name: batch.column(col) if col else empty for name, col in cols.items()}
        if tag is not None:
            out[tag[0]] = pa.array([tag[1]] * batch.num_rows, pa.int32())
        return pa.table(out)

    return ds.map_batches(canonical, batch_format="pyarrow", udf_modifying_row_count=False)


# ---------------------------------------------------------------- the prompt template


def format_prompt(instruction: str, input: str = "", labels: Sequence[str] | None = None) -> str:
    """The prompt of training and evaluation alike (template ``TEMPLATE_VERSION``)::

        {instruction}
        Options: {label 1}, {label 2}, ...     <- when labels are given, unless the instruction already lists them
        Input: {input}                         <- when the input is not empty
        Answer:

    The answer follows as ``format_target(output)``; a causal LM sees ``prompt + " " + output + EOS``.
    """
    parts = [instruction.strip()] if instruction.strip() else []
    if labels and ", ".join(labels) not in instruction:
        parts.append("Options: " + ", ".join(labels))
    if input.strip():
        parts.append("Input: " + input.strip())
    parts.append("Answer:")
    return "\n".join(parts)


def format_target(output: str, *, seq2seq: bool = False) -> str:
    """The answer text: after "Answer:" a causal LM continues with a space; a seq2seq decoder starts fresh."""
    return output.strip() if seq2seq else " " + output.strip()
