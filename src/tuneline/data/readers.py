"""Read JSONL, CSV and Parquet into records that remember their file and line.

Every unreadable line becomes a :class:`Problem` naming the file and line; nothing is skipped
silently. A reader returns the records it could read together with the problems it found, so a
caller can report all of them at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.errors import DataError, Problem


@dataclass(frozen=True)
class Record:
    """One row of a data file. ``line`` is 1-based (for Parquet: the row number)."""

    file: str
    line: int
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sha256: str = ""


def read_records(path: Path, fmt: str, display: str | None = None) -> ReadResult:
    """Read every row of ``path``. Raises :class:`DataError` only if the file cannot be opened."""
    name = display or str(path)
    if not path.is_file():
        raise DataError(Problem("data file not found", where=name,
                                hint="check the path; relative paths are resolved against the spec file's folder"))
    raw = path.read_bytes()
    out = ReadResult(sha256=hashlib.sha256(raw).hexdigest())
    if fmt == "jsonl":
        _read_jsonl(raw, name, out)
    elif fmt == "csv":
        _read_csv(raw, name, out)
    elif fmt == "parquet":
        _read_parquet(path, name, out)
    else:  # guarded by the spec, kept for API callers
        raise DataError(Problem(f"unknown format {fmt!r}", where=name, hint="use jsonl, csv or parquet"))
    return out


def _read_jsonl(raw: bytes, name: str, out: ReadResult) -> None:
    seen: dict[str, None] = {}
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.problems.append(Problem(f"invalid UTF-8 at byte {exc.start}", where=f"{name}:{i}",
                                        hint="re-save the file as UTF-8"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            out.problems.append(Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", where=f"{name}:{i}",
                                        hint="each line must be one JSON object"))
            continue
        if not isinstance(obj, dict):
            out.problems.append(Problem(f"expected a JSON object, got {type(obj).__name__}", where=f"{name}:{i}"))
            continue
        seen.update(dict.fromkeys(obj))
        out.records.append(Record(name, i, obj))
    out.columns = list(seen)


def _read_csv(raw: bytes, name: str, out: ReadResult) -> None:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(Problem(f"invalid UTF-8 at byte {exc.start}", where=f"{name}:{line}",
                                hint="re-save the file as UTF-8")) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        out.problems.append(Problem("file is empty (no header row)", where=f"{name}:1"))
        return
    except csv.Error as exc:
        raise DataError(Problem(f"cannot parse the CSV header: {exc}", where=f"{name}:1")) from None
    out.columns = [h.strip() for h in header]
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            out.problems.append(Problem(f"bad CSV: {exc}", where=f"{name}:{start}",
                                        hint="check quoting: a field with commas or quotes must be in double quotes"))
            # csv cannot resynchronise after a quoting error: stop here, counted as a problem
            break
        line = start
        start = reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            out.problems.append(Problem(f"expected {len(header)} fields, found {len(row)}", where=f"{name}:{line}",
                                        hint="check quoting: a field with commas must be in double quotes"))
            continue
        out.records.append(Record(name, line, dict(zip(out.columns, row, strict=True))))


def _read_parquet(path: Path, name: str, out: ReadResult) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types
        raise DataError(Problem(f"cannot read Parquet: {exc}", where=name)) from None
    out.columns = list(table.column_names)
    for i, row in enumerate(table.to_pylist(), start=1):
        out.records.append(Record(name, i, row))
