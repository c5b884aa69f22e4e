"""Erasing rows from stored dataset versions (``tuneline data forget``).

A version keeps its id (models name it), and every file of its folder that quotes rows is
rewritten without the matching ones: the Parquet splits, ``rejects.jsonl``, the manifest's
conflict groups, the preference pairs and the row links of harvested feedback (training rows are
renumbered), and the data card; the manifest's counts and row statistics are recounted and it
records the erasure (id, when, counts; never the content). The copies of the manifest and data
card that runs logged to the workspace's MLflow artifact store are replaced by the new ones.

:func:`residue` finds the text files (and Parquet files) under a folder that still hold matching
text: what tuneline does not rewrite (evaluation reports of runs, files someone put there).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneline.artifacts import atomic_write_bytes, atomic_write_text
from tuneline.curation.erasure import Query, View, empty_view, example_view, record_view, row_view
from tuneline.curation.pipeline import Conflict
from tuneline.curation.steps import RejectRow
from tuneline.curation.version import (
    SPLITS,
    DatasetVersion,
    ErasureRecord,
    Manifest,
    data_card,
    list_versions,
    load_version,
    recount,
    write_split,
)
from tuneline.data.examples import Example

LINKS_FILE = "requests.json"  # tuneline.registry.FEEDBACK_LINKS (a layer above): training row -> request ids
REJECTS_FILE = "rejects.jsonl"
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".csv", ".yaml", ".yml", ".html")
MAX_SCANNED_BYTES = 200 << 20


@dataclass
class VersionErasure:
    """What an erasure removes from one dataset version. ``where``: the source lines (file:line)
    of the removed rows; ``shown``: their text, for the terminal of a dry run only."""

    id: str
    removed: dict[str, int]
    rejects: int = 0
    conflicts: int = 0
    other_rows: dict[str, int] = field(default_factory=dict)  # other files of the folder: file -> rows
    artifacts: int = 0  # MLflow artifact copies rewritten
    where: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.removed.values())

    @property
    def touched(self) -> bool:
        return bool(self.rows or self.rejects or self.conflicts or sum(self.other_rows.values()))


@dataclass
class _Plan:
    """The rows of a version and which of them go."""

    version: DatasetVersion
    splits: dict[str, list[Example]]
    hits: dict[str, set[int]]
    rejects: list[RejectRow]
    rejects_kept: list[RejectRow]
    conflicts: list[Conflict]
    groups_dropped: int
    lines: dict[str, list[str]]  # other JSONL file -> its lines kept


def erase_versions(datasets_dir: Path, query: Query, erasure_id: str, *, artifact_root: Path | None = None,
                   dry_run: bool = False) -> list[VersionErasure]:
    """Remove the rows ``query`` matches from every stored version (nothing written when
    ``dry_run``); the versions touched, oldest first."""
    artifacts = list(_artifact_manifests(artifact_root)) if artifact_root is not None else []
    out = []
    for m in list_versions(datasets_dir):
        result = erase_version(load_version(m["id"], datasets_dir), query, erasure_id, artifacts=artifacts,
                               dry_run=dry_run)
        if result.touched:
            out.append(result)
    return out


def erase_version(version: DatasetVersion, query: Query, erasure_id: str, *, artifacts: list[Path] | None = None,
                  dry_run: bool = False) -> VersionErasure:
    plan = _plan(version, query)
    result = VersionErasure(version.id, {s: len(plan.hits[s]) for s in SPLITS},
                            rejects=len(plan.rejects) - len(plan.rejects_kept),
                            conflicts=plan.groups_dropped + _rows_dropped(version.manifest["conflicts"], plan.conflicts))
    for split, hit in plan.hits.items():
        rows = plan.splits[split]
        result.where += [rows[i].where for i in sorted(hit)]
        result.shown += [" | ".join(example_view(rows[i])["messages"]) for i in sorted(hit)]
    kept_ids = {id(r) for r in plan.rejects_kept}
    result.where += [r["where"] for r in plan.rejects if id(r) not in kept_ids and r["where"]]
    for name, kept in plan.lines.items():
        before = _jsonl_lines(version.path / name)
        if len(kept) < len(before):
            result.other_rows[name] = len(before) - len(kept)
    if dry_run or not result.touched:
        return result
    _rewrite(plan, result, erasure_id)
    for path in artifacts or []:
        if _manifest_id(path) == version.id:
            _replace_copy(version.path, path.parent)
            result.artifacts += 1
    return result


def _replace_copy(version_dir: Path, copy: Path) -> None:
    """Overwrite the files of a copy of a version (a run's ``dataset/`` artifacts) with the version's
    own, as they are after the erasure (a copy may hold only some: older runs logged the manifest
    and the card alone)."""
    for f in version_dir.iterdir():
        if f.is_file() and (copy / f.name).is_file():
            atomic_write_bytes(copy / f.name, f.read_bytes())


def _plan(version: DatasetVersion, query: Query) -> _Plan:
    splits = {s: version.split(s) for s in SPLITS}
    hits = {s: {i for i, ex in enumerate(rows) if query.hits(example_view(ex))} for s, rows in splits.items()}
    gone = {(s, splits[s][i].where) for s, hit in hits.items() for i in hit}
    rejects = version.rejects()
    kept = [r for r in rejects if not query.hits(row_view(r["row"], r["reason"]))]
    conflicts, groups_dropped = _erase_conflicts(version.manifest["conflicts"], query, gone)
    lines = {}
    for path in sorted(version.path.glob("*.jsonl")):
        if path.name != REJECTS_FILE:
            lines[path.name] = [line for line in _jsonl_lines(path) if not query.hits(_line_view(line))]
    return _Plan(version, splits, hits, rejects, kept, conflicts, groups_dropped, lines)


def _erase_conflicts(conflicts: list[Conflict], query: Query, gone: set[tuple[str, str]]) -> tuple[list[Conflict], int]:
    """The conflict groups without the rows ``query`` matches (or that were erased from the
    splits); a group whose input matches, or with fewer than two rows left, goes whole."""
    out: list[Conflict] = []
    dropped = 0
    for c in conflicts:
        head = empty_view()
        head["prompt"] = head["messages"] = [c["input"]]
        if query.hits(head):
            dropped += 1
            continue
        rows = [r for r in c["rows"] if (c["split"], r["where"]) not in gone and not query.hits(_answer_view(r["answer"]))]
        if len(rows) < 2:
            dropped += 1
            continue
        out.append({**c, "rows": rows})
    return out, dropped


def _rows_dropped(before: list[Conflict], after: list[Conflict]) -> int:
    """Groups that stay but lost rows."""
    left = {(c["split"], c["input"]): len(c["rows"]) for c in after}
    return sum(1 for c in before if (c["split"], c["input"]) in left and left[(c["split"], c["input"])] < len(c["rows"]))


def _answer_view(answer: str) -> View:
    view = empty_view()
    view["answer"] = view["messages"] = [answer]
    view["label"] = [answer]
    return view


def _line_view(line: str) -> View:
    """A line of a JSONL file in a version folder: a preference pair (prompt turns, chosen and
    rejected answers) or a row in a task's columns."""
    try:
        value = json.loads(line)
    except ValueError:
        view = empty_view()
        view["other"] = [line]
        return view
    if not isinstance(value, dict):
        view = empty_view()
        view["other"] = [line]
        return view
    if "chosen" in value:
        view = record_view({"messages": value.get("prompt", [])})
        view["prompt"] += view["answer"]
        view["answer"] = [str(value.get("chosen", "")), str(value.get("rejected", ""))]
        view["messages"] += view["answer"]
        return view
    return record_view(value)


def _rewrite(plan: _Plan, result: VersionErasure, erasure_id: str) -> None:
    v = plan.version
    kept = {s: [ex for i, ex in enumerate(rows) if i not in plan.hits[s]] for s, rows in plan.splits.items()}
    for split in SPLITS:
        if plan.hits[split]:
            tmp = v.path / f".{split}.parquet.erasing"
            write_split(tmp, kept[split])
            os.replace(tmp, v.path / f"{split}.parquet")
    if result.rejects:
        atomic_write_text(v.path / REJECTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in plan.rejects_kept))
    for name, lines in plan.lines.items():
        if name in result.other_rows:
            atomic_write_text(v.path / name, "".join(line + "\n" for line in lines))
    if plan.hits["train"]:
        _renumber_links(v.path / LINKS_FILE, plan.hits["train"])
    m: Manifest = json.loads((v.path / "manifest.json").read_text())
    recount(m, kept)
    m["rejected"] = len(plan.rejects_kept)
    m["conflicts"] = plan.conflicts
    m["conflict_groups"] = max(0, m["conflict_groups"] - plan.groups_dropped)
    record: ErasureRecord = {"id": erasure_id, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "removed": result.removed, "rejects": result.rejects, "conflicts": result.conflicts}
    m["erasures"] = [*m.get("erasures", []), record]
    atomic_write_text(v.path / "manifest.json", json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(v.card, data_card(m))


def _renumber_links(path: Path, erased: set[int]) -> None:
    """The row links of a version's training rows after rows ``erased`` left the train split:
    their links go, the rows after them move up."""
    if not path.is_file():
        return
    links = json.loads(path.read_text())
    order = sorted(erased)
    rows = []
    for r in links.get("rows", []):
        i = int(r["row"])
        if i in erased:
            continue
        rows.append({**r, "row": i - sum(1 for e in order if e < i)})
    links["rows"] = rows
    links["request_ids"] = sorted({rid for r in rows for rid in r["request_ids"]})
    atomic_write_text(path, json.dumps(links, indent=1) + "\n")


def _jsonl_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def _artifact_manifests(root: Path) -> Iterator[Path]:
    """The dataset manifests runs logged to the local MLflow artifact store (``<run>/artifacts/dataset/``)."""
    if root.is_dir():
        yield from root.rglob("dataset/manifest.json")


def _manifest_id(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value.get("id") if isinstance(value, dict) else None


# ---------------------------------------------------------------------- what is left


def residue(root: Path, query: Query, *, skip: tuple[Path, ...] = ()) -> list[str]:
    """The files under ``root`` (text, JSON, Parquet) holding a text ``query`` matches, as paths;
    folders in ``skip`` are left out."""
    found = []
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        if not path.is_file() or any(path.is_relative_to(s) for s in skip):
            continue
        if path.suffix not in (*TEXT_SUFFIXES, ".parquet") or path.stat().st_size > MAX_SCANNED_BYTES:
            continue
        view = empty_view()
        view["other"] = list(file_texts(path))
        if query.hits(view):
            found.append(str(path))
    return found


def file_texts(path: Path) -> Iterator[str]:
    """Every text in a file: a JSON file's strings (escapes decoded), a JSONL file's per line,
    a Parquet file's string cells (and the strings of JSON in them), else the whole text."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for column in pq.read_table(path).to_pydict().values():
            for cell in column:
                if isinstance(cell, str):
                    yield cell
                    yield from _json_strings(cell)
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    yield text
    if path.suffix == ".json":
        yield from _json_strings(text)
    elif path.suffix == ".jsonl":
        for line in text.splitlines():
            yield from _json_strings(line)


def _json_strings(text: str) -> Iterator[str]:
    try:
        value = json.loads(text)
    except ValueError:
        return
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


__all__ = ["VersionErasure", "erase_version", "erase_versions", "file_texts", "residue"]
