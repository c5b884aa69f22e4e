"""Read JSONL, CSV and Parquet into records that remember their file and line.

Every unreadable line becomes a :class:`Problem` naming the file and line; nothing is skipped
silently. A reader returns the records it could read together with the problems it found, so a
caller can report all of them at once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.errors import DataError, Problem


@dataclass(frozen=True)
class Record:
    """One row of a data file. ``line`` is 1-based (for Parquet: the row number)."""

    file: str
    line: int
    fields: dict[str, object]  # the row's values as read (JSON values, CSV strings, Parquet scalars)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sha256: str = ""
    raw: dict[str, str] = field(default_factory=dict)  # problem location -> the line as read (for rejects)


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


# What bytes.strip() strips: the ASCII whitespace.
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


def _jsonl_lines(raw: bytes, name: str, out: ReadResult) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line that is not blank; a line that is not UTF-8 becomes a problem."""
    try:
        whole = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        for i, line in enumerate(whole.split("\n"), start=1):
            if line.strip(_ASCII_WHITESPACE):
                yield i, line
        return
    for i, bline in enumerate(raw.split(b"\n"), start=1):  # decoded one by one: each bad line is reported
        if not bline.strip():
            continue
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            _bad(out, Problem(f"invalid UTF-8 at byte {exc.start}", where=f"{name}:{i}",
                              hint="re-save the file as UTF-8"), bline.decode("utf-8", "replace"))
            continue
        yield i, line


# What json.loads runs (the C scanner of a default decoder), without the checks around it.
_scan_value: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``json.loads(text)``, quicker for a line that is one JSON value with nothing around it."""
    try:
        value, end = _scan_value(text, 0)
    except (StopIteration, ValueError):
        value, end = None, -1
    # anything else (leading or trailing whitespace, a byte order mark, bad JSON) goes the usual
    # way, which also raises the usual error
    return value if end == len(text) else json.loads(text)


def _read_jsonl(raw: bytes, name: str, out: ReadResult) -> None:
    seen: dict[str, Any] = {}  # the columns, in order of first appearance (the values do not matter)
    records = out.records
    for i, text in _jsonl_lines(raw, name, out):
        try:
            obj = _loads(text)
        except json.JSONDecodeError as exc:
            _bad(out, Problem(f"invalid JSON: {exc.msg} (column {exc.colno})", where=f"{name}:{i}",
                              hint="each line must be one JSON object"), text)
            continue
        if not isinstance(obj, dict):
            _bad(out, Problem(f"expected a JSON object, got {type(obj).__name__}", where=f"{name}:{i}"), text)
            continue
        seen.update(obj)
        records.append(Record(name, i, obj))
    out.columns = list(seen)


def _bad(out: ReadResult, problem: Problem, raw: str) -> None:
    out.problems.append(problem)
    out.raw[problem.where or ""] = raw


def _read_csv(raw: bytes, name: str, out: ReadResult) -> None:
    # undecodable bytes become lone surrogates, so the rest of the file is still read and each
    # line holding one is reported by itself
    text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    lines = text.splitlines(keepends=True)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        out.problems.append(Problem("file is empty (no header row)", where=f"{name}:1"))
        return
    except csv.Error as exc:
        raise DataError(Problem(f"cannot parse the CSV header: {exc}", where=f"{name}:1")) from None
    if _SURROGATE.search("".join(header)):
        raise DataError(Problem("invalid UTF-8 in the header row", where=f"{name}:1", hint="re-save the file as UTF-8"))
    out.columns = [h.strip() for h in header]
    _csv_rows(lines, reader.line_num, name, out)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _csv_rows(lines: list[str], start: int, name: str, out: ReadResult) -> None:
    """Rows from physical line ``start`` (0-based) on. After a quoting error the reader restarts on
    the next line, so one bad row does not hide the rest of the file."""
    n_fields = len(out.columns)
    while start < len(lines):
        reader = csv.reader(lines[start:], strict=True)
        first = start + 1  # 1-based line of the row about to be read
        try:
            for row in reader:
                line, first = first, start + reader.line_num + 1
                if not row or all(not c.strip() for c in row):
                    continue
                joined = ",".join(row)
                if _SURROGATE.search(joined):
                    _bad(out, Problem("invalid UTF-8", where=f"{name}:{line}", hint="re-save the file as UTF-8"),
                         joined.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
                    continue
                if len(row) != n_fields:
                    _bad(out, Problem(f"expected {n_fields} fields, found {len(row)}", where=f"{name}:{line}",
                                      hint="check quoting: a field with commas must be in double quotes"), joined)
                    continue
                out.records.append(Record(name, line, dict(zip(out.columns, row, strict=True))))
            return
        except csv.Error as exc:
            _bad(out, Problem(f"bad CSV: {exc}", where=f"{name}:{first}",
                              hint="check quoting: a field with commas or quotes must be in double quotes"),
                 lines[first - 1].rstrip("\r\n"))
            start = first  # resume on the line after the one the bad row started on


def _read_parquet(path: Path, name: str, out: ReadResult) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types
        raise DataError(Problem(f"cannot read Parquet: {exc}", where=name)) from None
    out.columns = list(table.column_names)
    for i, row in enumerate(table.to_pylist(), start=1):
        out.records.append(Record(name, i, row))
