"""Finding input files and reading raw documents out of them.

Three kinds of input: plain text (a whole file is one document, or each blank-line separated block is
one), JSONL (one JSON object per line, the text in a field) and Parquet (the text in a column). Any of
them may be gzipped (`.gz`). Directories expand recursively, in sorted order so runs are reproducible.

Reading happens in the parent process and is kept cheap on purpose: JSON parsing, filtering and
tokenizing happen in the workers. So a `Record` carries the raw payload plus where it came from, for
error messages that name the file and line.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}

# One or more blank (whitespace-only) lines separate documents in --split-blank-lines mode.
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


class DataError(ValueError):
    """Bad input data or a bad prepared-data directory. The message names the file and what is wrong."""


@dataclass(frozen=True)
class InputOptions:
    jsonl_field: str = "text"
    parquet_column: str = "text"
    split_blank_lines: bool = False  # text files: one document per blank-line separated block


@dataclass(frozen=True)
class Record:
    """One raw document. `kind` is "text" (payload is the document) or "json" (payload is a JSON line)."""

    kind: str
    payload: str
    where: str  # "path" or "path:line", for error messages


def input_kind(path: Path) -> str | None:
    """"text", "jsonl", "parquet" or None (not an input we know), judged by the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files to read, in order. A directory contributes every known input file below it, sorted;
    a file named explicitly is read even with an unknown suffix (as text)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and input_kind(p) is not None
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError(f"no input files found in {', '.join(str(i) for i in inputs)}")
    return list(dict.fromkeys(p.resolve() for p in files))  # a file named twice is read once


def _open_text(path: Path) -> io.TextIOBase:
    # newline="" keeps "\r\n" as it is: prepared shards must decode back to the exact input text.
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def read_records(path: Path, options: InputOptions, skip: int = 0) -> Iterator[Record]:
    """The documents of one input file as raw records, after skipping the first `skip` of them
    (a resumed run restarts in the middle of a file)."""
    kind = input_kind(path) or "text"
    if kind == "parquet":
        records = _parquet_records(path, options.parquet_column)
    elif kind == "jsonl":
        records = _jsonl_records(path)
    elif options.split_blank_lines:
        records = (
            Record("text", block, str(path)) for block in _BLANK_LINES.split(_read_text(path)) if block.strip()
        )
    else:
        records = iter([Record("text", _read_text(path), str(path))])
    for i, record in enumerate(records):
        if i >= skip:
            yield record


def document_text(record: Record, jsonl_field: str) -> str:
    """The text of a record; JSON lines are parsed here, in the worker, because parsing is not free."""
    if record.kind == "text":
        return record.payload
    try:
        obj = json.loads(record.payload)
    except json.JSONDecodeError as e:
        raise DataError(f"{record.where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or jsonl_field not in obj:
        found = ", ".join(map(repr, obj)) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise DataError(f"{record.where}: no field {jsonl_field!r} (found {found}); choose one with --jsonl-field")
    value = obj[jsonl_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field {jsonl_field!r} holds {type(value).__name__}, not text")
    return value


def _jsonl_records(path: Path) -> Iterator[Record]:
    try:
        with _open_text(path) as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield Record("json", line, f"{path}:{line_number}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None


def _parquet_records(path: Path, column: str) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)}); choose one with --parquet-column")
    row = 0
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: row {row}: column {column!r} holds {type(value).__name__}, not text")
            yield Record("text", value or "", f"{path}:row {row}")
