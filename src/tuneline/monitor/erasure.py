"""Erasure in the request log and the harvested feedback files (``tuneline data forget``).

A request matches by its logged prompt (every message's text: the input turns as ``prompt``, a
trailing assistant turn as ``answer``), its response (``answer``) and the label a classification
adapter predicted (``label``); a feedback entry by its correction (``answer`` and ``label``) and
comment (``other``). Deleting a request deletes the feedback on it. The harvested rows
(``feedback/<NAME>/harvest-*.jsonl``) and the retraining inputs (``feedback/<NAME>/retrain-*/*.jsonl``)
are rewritten without the matching lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneline.artifacts import atomic_write_text
from tuneline.curation.erasure import Query, View, empty_view, record_view
from tuneline.monitor.store import FeedbackRow, RequestLog, StoredRequest


def request_view(row: StoredRequest) -> View:
    view = empty_view()
    prompt = row.get("prompt")
    try:
        value = json.loads(prompt) if prompt else None
    except ValueError:
        value = prompt
    if isinstance(value, list):
        view = record_view({"messages": value})
        if view["answer"]:  # a trailing assistant turn the client sent is part of its input
            view["prompt"] += view["answer"]
            view["answer"] = []
    elif isinstance(value, str):
        view["prompt"] = view["messages"] = [value]
    if row.get("response"):
        view["answer"].append(str(row["response"]))
        view["messages"].append(str(row["response"]))
    if row.get("predicted_label"):
        view["label"].append(str(row["predicted_label"]))
    return view


def feedback_view(row: FeedbackRow) -> View:
    view = empty_view()
    if row.get("correction"):
        view["answer"] = view["label"] = view["messages"] = [str(row["correction"])]
    if row.get("comment"):
        view["other"] = [str(row["comment"])]
    return view


@dataclass
class LogErasure:
    """What an erasure removes from the request log: requests, and feedback entries (those on a
    removed request included). ``shown``: the matching texts, for a dry run's terminal only."""

    requests: int = 0
    feedback: int = 0
    request_ids: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)


def erase_log(log: RequestLog, query: Query, *, dry_run: bool = False) -> LogErasure:
    """Delete the requests and feedback ``query`` matches (and the feedback on those requests);
    a SQLite file is compacted afterwards so no deleted text stays in its free pages."""
    shown: list[str] = []

    def hits_request(row: StoredRequest) -> bool:
        view = request_view(row)
        if query.hits(view):
            shown.append(" | ".join(view["messages"]))
            return True
        return False

    def hits_feedback(row: FeedbackRow) -> bool:
        view = feedback_view(row)
        if query.hits(view):
            shown.append(" | ".join(view["messages"] + view["other"]))
            return True
        return False

    ids = log.requests_matching(hits_request)
    feedback = log.feedback_matching(hits_feedback, ids)
    out = LogErasure(len(ids), len(feedback), ids, shown)
    if dry_run or not (ids or feedback):
        return out
    out.feedback = log.delete_feedback(feedback)
    out.requests = log.delete_requests(ids)
    log.compact()
    return out


def erase_feedback_files(feedback_root: Path, query: Query, *, dry_run: bool = False) -> dict[str, int]:
    """Remove the lines ``query`` matches from every JSONL file under ``feedback_root`` (each
    model's harvested rows and retraining inputs); returns file -> lines removed."""
    out: dict[str, int] = {}
    for path in sorted(feedback_root.rglob("*.jsonl")) if feedback_root.is_dir() else []:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in lines if not query.hits(_line_view(line))]
        if len(kept) == len(lines):
            continue
        out[str(path)] = len(lines) - len(kept)
        if not dry_run:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
    return out


def _line_view(line: str) -> View:
    try:
        value = json.loads(line)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return record_view({k: v for k, v in value.items() if k not in ("request_ids", "feedback_ids")})
    view = empty_view()
    view["other"] = [line]
    return view


__all__ = ["LogErasure", "erase_feedback_files", "erase_log", "feedback_view", "request_view"]
