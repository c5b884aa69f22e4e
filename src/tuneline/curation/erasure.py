"""Erasure requests (``tuneline data forget``): what a request matches, and the filter that keeps
erased rows out of every later dataset version.

A request is ``--match COLUMN=VALUE`` (a field equals VALUE) or ``--contains TEXT`` (any text
field holds TEXT). Both compare *erasure keys* (:func:`erase_key`): the text after the
normalization curation applies with ``normalize.unicode: NFKC`` (control and format characters
deleted, NFKC, whitespace cleaned), then case-folded with every run of whitespace made one space
(as exact deduplication compares inputs). So ``JOHN  Smith`` matches ``john smith``.

Every place that holds rows (dataset versions, rejects, harvested feedback files, the request and
feedback log) describes a row as a :data:`View`: its texts by kind -- ``prompt`` (the input
turns), ``answer`` (the final answer or reference), ``label``, ``messages`` (every turn but the
spec's system prompt) and ``other`` (texts of unknown role: the fields of a row that could not be
built, a reject's reason). ``--match`` compares the column's kind and ``other``; ``--contains``
every text.

The workspace keeps each request as a keyed digest (keyed BLAKE2b under a per-workspace secret key,
``erasure/key``, mode 0600), never as text: ``--match`` as the digest of the value's key,
``--contains`` as the digest of the text's key and its length, which every window of that length
of a row's keys is checked against. Curation drops the rows the filter matches first
(:func:`apply_filter`), counts them as ``erased`` and keeps no reject with their content.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from tuneline.curation.steps import Recorder, Splits, input_of
from tuneline.curation.textops import dedup_key, normalize_text
from tuneline.data.examples import Example
from tuneline.errors import Problem, TunelineError
from tuneline.workspace import Workspace

ERASURE_PREFIX = "er-"
KEY_FILE = "key"
REQUESTS_FILE = "erasures.jsonl"
STEP = "erasure"
DROP_KIND = "erased"
KINDS = ("prompt", "answer", "label", "messages", "other")
# COLUMN of --match -> the kind of text it names: the neutral names and each task's logical columns
COLUMNS = {"prompt": "prompt", "text": "prompt", "instruction": "prompt", "source": "prompt",
           "answer": "answer", "response": "answer", "summary": "answer", "target": "answer",
           "correction": "answer", "label": "label", "messages": "messages"}

Mode = Literal["match", "contains"]
View = dict[str, list[str]]  # kind -> the row's texts of that kind


class ErasureError(TunelineError):
    """An erasure request that cannot be carried out (bad option, missing key)."""


def erase_key(text: str) -> str:
    """``text`` as erasure compares it: control characters deleted, NFKC, whitespace cleaned,
    case-folded, every whitespace run one space."""
    return dedup_key(normalize_text(text, "NFKC", whitespace=True, control_chars=True))


def empty_view() -> View:
    return {k: [] for k in KINDS}


@dataclass(frozen=True)
class Query:
    """One erasure request: ``mode`` match (``column`` equals) or contains; ``needle`` is the
    erasure key of the value (it lives in memory only)."""

    mode: Mode
    column: str | None
    needle: str

    def hits(self, view: View) -> bool:
        if self.mode == "contains":
            return any(self.needle in erase_key(t) for texts in view.values() for t in texts)
        assert self.column is not None
        return any(erase_key(t) == self.needle for t in (*view[self.column], *view["other"]))

    def describe(self) -> str:
        """The request in words, without its text."""
        return f"rows whose {self.column} equals the value" if self.mode == "match" else "rows holding the text"


def parse_query(match: str | None, contains: str | None) -> Query:
    """The request from ``--match COLUMN=VALUE`` or ``--contains TEXT`` (exactly one of them)."""
    if (match is None) == (contains is None):
        raise ErasureError(Problem("give exactly one of --match COLUMN=VALUE and --contains TEXT",
                                   field="--match/--contains",
                                   hint="e.g. --match text='my exact message' or --contains 'Jane Doe'"))
    if contains is not None:
        needle = erase_key(contains)
        if not needle:
            raise ErasureError(Problem("--contains needs a text that is not empty or only spaces",
                                       field="--contains"))
        return Query("contains", None, needle)
    assert match is not None
    column, sep, value = match.partition("=")
    column = column.strip().lower()
    if not sep or column not in COLUMNS:
        known = ", ".join(sorted(COLUMNS))
        what = f"unknown column {column!r}" if sep else f"--match needs COLUMN=VALUE, not {match!r}"
        raise ErasureError(Problem(what, field="--match", hint=f"COLUMN is one of {known}"))
    needle = erase_key(value)
    if not needle:
        raise ErasureError(Problem(f"--match {column}= needs a value", field="--match"))
    return Query("match", COLUMNS[column], needle)


# ---------------------------------------------------------------------- rows as views


def example_view(ex: Example) -> View:
    """A curated example: its input (whole, and each input turn), answer, label and turns; the
    spec's system prompt is not the row's data and is left out."""
    turns = [m["content"] for m in ex.messages if m["role"] != "system"]
    inputs = [m["content"] for m in ex.messages[:-1] if m["role"] != "system"]
    view = empty_view()
    view["prompt"] = [input_of(ex), *inputs] if len(inputs) > 1 else [input_of(ex)]
    view["answer"] = [ex.messages[-1]["content"], ex.reference]
    view["label"] = [ex.label] if ex.label is not None else []
    view["messages"] = turns
    return view


def record_view(record: Mapping[str, object]) -> View:
    """A row in a task's logical columns (harvested feedback, retraining inputs, a row that could
    not be built): each column by its kind, ``messages`` turn by turn; unknown columns as
    ``other``."""
    view = empty_view()
    for key, value in record.items():
        if key == "messages" and isinstance(value, list):
            _add_turns(view, value)
            continue
        kind = COLUMNS.get(key, "other")
        for text in _texts(value):
            view[kind].append(text)
            if kind in ("prompt", "answer"):
                view["messages"].append(text)
            if key == "label":
                view["answer"].append(text)
    return view


def _add_turns(view: View, turns: list[object]) -> None:
    msgs = [m for m in turns if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for i, m in enumerate(msgs):
        text = str(m["content"])
        view["messages"].append(text)
        last = i == len(msgs) - 1 and m.get("role") == "assistant"
        view["answer" if last else "prompt"].append(text)


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _texts(v)]
    return []


def row_view(row: Mapping[str, object], reason: str = "") -> View:
    """A stored reject's row (an example's JSON form, or the fields or raw line of a row that
    could not be built), with its reason as ``other``."""
    turns = row.get("messages")
    if isinstance(turns, list):
        msgs = tuple({"role": str(m.get("role")), "content": str(m.get("content"))}
                     for m in turns if isinstance(m, dict))
        label = row.get("label")
        view = example_view(Example("", msgs, str(row.get("reference") or ""), label if isinstance(label, str) else None)) \
            if msgs else empty_view()
    else:
        fields = row.get("fields")
        view = record_view(fields) if isinstance(fields, Mapping) else empty_view()
        view["other"].extend(_texts(row.get("raw")))
    if reason:
        view["other"].append(reason)
    return view


# ---------------------------------------------------------------------- the stored filter


@dataclass(frozen=True)
class Erasure:
    """One stored request: its id, when, and the keyed digest (never the text)."""

    id: str
    created: str
    mode: Mode
    column: str | None
    digest: str
    length: int | None  # contains: the length of the text's key

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "created": self.created, "mode": self.mode, "column": self.column,
                "digest": self.digest, "length": self.length}


def new_erasure_id() -> str:
    """A random id (never derived from the erased text)."""
    return ERASURE_PREFIX + time.strftime("%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(4)


def _mac(key: bytes, data: bytes, mode: Mode) -> bytes:
    """Keyed BLAKE2b (a MAC under the workspace key), 16 bytes; the mode separates the domains."""
    return hashlib.blake2b(data, key=key, digest_size=16, person=b"tuneline-" + mode[0].encode()).digest()


def _digest(key: bytes, mode: Mode, column: str | None, text: str) -> str:
    data = f"{column}\x00{text}".encode() if mode == "match" else text.encode()
    return _mac(key, data, mode).hex()


def workspace_key(ws: Workspace, *, create: bool) -> bytes | None:
    """The workspace's secret erasure key (32 random bytes in ``erasure/key``, mode 0600), made
    when ``create``; None when there is none."""
    path = ws.erasure_dir / KEY_FILE
    if not path.is_file() and create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    return path.read_bytes() if path.is_file() else None


def record_erasure(ws: Workspace, query: Query, erasure_id: str) -> Erasure:
    """Store ``query`` as a keyed digest in the workspace's filter."""
    key = workspace_key(ws, create=True)
    assert key is not None
    entry = Erasure(erasure_id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), query.mode, query.column,
                    _digest(key, query.mode, query.column, query.needle),
                    len(query.needle) if query.mode == "contains" else None)
    fd = os.open(ws.erasure_dir / REQUESTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(entry.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


@dataclass
class ErasureFilter:
    """The stored requests of a workspace, checked against rows by their keyed digests."""

    key: bytes
    erasures: list[Erasure]
    _match: dict[tuple[str, str], str] = field(default_factory=dict)  # (column, digest) -> id
    _contains: dict[int, dict[bytes, str]] = field(default_factory=dict)  # length -> digest -> id

    def __post_init__(self) -> None:
        for e in self.erasures:
            if e.mode == "match" and e.column is not None:
                self._match[(e.column, e.digest)] = e.id
            elif e.length:
                self._contains.setdefault(e.length, {})[bytes.fromhex(e.digest)] = e.id

    def erased_by(self, view: View) -> str | None:
        """The id of the first stored request ``view`` matches, or None."""
        keys = {kind: [erase_key(t) for t in texts] for kind, texts in view.items()}
        for column in {c for c, _ in self._match}:
            for k in (*keys.get(column, []), *keys["other"]):
                found = self._match.get((column, _digest(self.key, "match", column, k)))
                if found is not None:
                    return found
        return self._windows(k for ks in keys.values() for k in ks) if self._contains else None

    def _windows(self, keys: Iterable[str]) -> str | None:
        key, wanted = self.key, self._contains
        for text in set(keys):
            ascii_ = text.isascii()
            data = text.encode()
            for length, digests in wanted.items():
                for i in range(len(text) - length + 1):
                    window = data[i:i + length] if ascii_ else text[i:i + length].encode()
                    d = hashlib.blake2b(window, key=key, digest_size=16, person=b"tuneline-c").digest()
                    if d in digests:
                        return digests[d]
        return None


def load_filter(ws: Workspace) -> ErasureFilter | None:
    """The workspace's erasure filter, or None when no erasure was requested."""
    path = ws.erasure_dir / REQUESTS_FILE
    if not path.is_file():
        return None
    erasures = [Erasure(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if not erasures:
        return None
    key = workspace_key(ws, create=False)
    if key is None:
        raise ErasureError(Problem(f"{path} lists erasure requests but the key {ws.erasure_dir / KEY_FILE} is missing",
                                   where=str(path), hint="restore the key file from a backup: without it erased rows "
                                                         "cannot be recognized and curation would bring them back"))
    return ErasureFilter(key, erasures)


def apply_filter(flt: ErasureFilter, splits: Splits, rec: Recorder) -> Splits:
    """The ``erasure`` step: rows the filter matches are dropped and counted as ``erased``,
    without a reject; a reject recorded before (a row that could not be built) that matches
    keeps its place and reason kind but loses its content."""
    with rec.step(STEP, {"requests": len(flt.erasures)}, splits) as report:
        blanked = 0
        for i, r in enumerate(rec.rejects):
            found = flt.erased_by(row_view(r.row, r.reason))
            if found is not None:
                rec.rejects[i] = replace(r, reason=f"{r.reason.split(':', 1)[0]}: row erased ({found})", row={})
                blanked += 1
        out: Splits = {}
        by_request: dict[str, int] = {}
        for split, examples in splits.items():
            kept = []
            for ex in examples:
                found = flt.erased_by(example_view(ex))
                if found is None:
                    kept.append(ex)
                else:
                    by_request[found] = by_request.get(found, 0) + 1
            out[split] = kept
        n = sum(by_request.values())
        if n:
            report.dropped[DROP_KIND] = n
        report.details.update({"by_request": dict(sorted(by_request.items())), "rejects_emptied": blanked})
        return rec.finish(report, out)


__all__ = ["COLUMNS", "DROP_KIND", "Erasure", "ErasureError", "ErasureFilter", "Query", "View", "apply_filter",
           "empty_view", "erase_key", "example_view", "load_filter", "new_erasure_id", "parse_query",
           "record_erasure", "record_view", "row_view", "workspace_key"]
