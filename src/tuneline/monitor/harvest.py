"""Feedback harvesting: what users corrected (and, by policy, what they accepted) on a model's
logged answers becomes training rows, stored as a new dataset version through the normal curation.

For every logged request of the model with feedback (its latest correction and latest rating
decide; :class:`~tuneline.spec.monitor.FeedbackSpec` is the policy):

- a correction becomes a row in the spec's task format: the user's input from the logged prompt
  and the correction as the answer (classification: the correction must be one of the labels);
- an answer rated at least ``min_positive_rating`` without a correction becomes a row with the
  logged answer, when ``accepted_as_positive``;
- a corrected answer is also kept as a preference pair (prompt, chosen = the correction,
  rejected = the logged answer) in the version's ``preferences.jsonl``.

Requests with the same input and the same answer become one row listing every request id. The
rows are written to ``<workspace>/feedback/<NAME>/harvest-<time>.jsonl`` and curated with the
spec's own curation (PII, deduplication, decontamination against the spec's test set and golden
sets; the harvested rows all stay training rows). The version's folder also holds
:data:`~tuneline.registry.FEEDBACK_LINKS` (each training row's request and feedback ids) and
:data:`HARVEST_FILE` (a harvest of model NAME from requests X..Y, and every skipped feedback entry
counted by reason). Feedback already harvested into a version is not harvested again (unless
``everything``); a harvest without new feedback returns the last harvest's version, and the same
rows always give the same version id (ids are content hashes).

The log is read through the store's API (:class:`~tuneline.monitor.store.RequestLog`: feedback,
then the requests it is about).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from tuneline.artifacts import atomic_write_text
from tuneline.curation import DatasetVersion, curate, load_version, save_version
from tuneline.curation.erasure import load_filter
from tuneline.curation.pii import Redactor
from tuneline.curation.preferences import (
    PREFERENCES_FILE,  # beside the manifest: (prompt, chosen, rejected)
)
from tuneline.data.examples import Example, Message, build_examples
from tuneline.data.readers import read_records
from tuneline.errors import DataError, Problem, TunelineError
from tuneline.monitor.store import RequestLog, RequestLogError
from tuneline.registry import FEEDBACK_LINKS
from tuneline.spec import LoadedSpec
from tuneline.spec.models import DataSource
from tuneline.spec.monitor import FeedbackSpec
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    pass

HARVEST_FILE = "harvest.json"  # beside the manifest: what the version was harvested from
_ID_CHUNK = 500  # ids per IN (...) query (SQLite allows 999 parameters)

# the logical columns of each task type's rows: (input, answer); chat rows are one `messages` list
_COLUMNS = {"classification": ("text", "label"), "instruction": ("instruction", "response"),
            "structured": ("instruction", "response"), "summarization": ("text", "summary"),
            "translation": ("source", "target")}

Record = dict[str, object]  # one row of a harvested file, in the task's logical columns


class FeedbackError(TunelineError):
    """Feedback cannot be harvested (the request log cannot be read, nothing to retrain on)."""


@dataclass(frozen=True)
class LoggedRequest:
    id: str
    created: float
    model_name: str | None
    prompt: str  # JSON: the messages list, or the completion prompt (PII redacted)
    response: str | None


@dataclass(frozen=True)
class FeedbackEntry:
    id: int
    response_id: str
    created: float
    rating: int | None
    correction: str | None


def read_log(log: RequestLog, *, since: float | None = None) -> tuple[list[FeedbackEntry], dict[str, LoggedRequest]]:
    """Every feedback entry (created at or after ``since``), oldest first, and the logged requests
    it is about, by id."""
    try:
        entries = [FeedbackEntry(int(r["id"]), str(r["response_id"]), float(r["created"]), r["rating"], r["correction"])
                   for r in log.feedback(since=since)]
        found = {rid: LoggedRequest(rid, float(r["created"]), r["model_name"], r["prompt"] or "", r["response"])
                 for rid, r in log.requests_by_id({e.response_id for e in entries}).items()}
    except RequestLogError as exc:
        raise FeedbackError(Problem(str(exc), hint="serve the model (`tuneline serve`) so requests and feedback are "
                                                   "logged, or pass the log's URL with --requests")) from exc
    return entries, found


# ---------------------------------------------------------------------- rows from feedback


def prompt_messages(prompt: str) -> list[Message] | None:
    """The logged prompt (JSON) as messages: a completion prompt is one user turn; None when it
    holds no user turn."""
    try:
        value = json.loads(prompt)
    except ValueError:
        return None
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if not isinstance(value, list):
        return None
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in value
            if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)]
    while msgs and msgs[-1]["role"] == "assistant":  # the answer is the model's (or the correction)
        msgs.pop()
    return msgs if any(m["role"] == "user" and m["content"].strip() for m in msgs) else None


def task_record(task_type: str, prompt: Sequence[Message], answer: str) -> Record | None:
    """A row in the logical columns of ``task_type``: the last user turn as the input and
    ``answer`` as the answer (chat: the conversation with ``answer`` as the last turn)."""
    if task_type == "chat":
        return {"messages": [*(dict(m) for m in prompt), {"role": "assistant", "content": answer}]}
    user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
    if user is None:
        return None
    inp, out = _COLUMNS[task_type]
    return {inp: user, out: answer}


def example_record(task_type: str, ex: Example) -> Record | None:
    """A curated example back in its task's logical columns (what :func:`build_examples` reads)."""
    answer = ex.label if ex.label is not None else ex.messages[-1]["content"]
    return task_record(task_type, ex.prompt_messages, answer)


@dataclass
class HarvestRow:
    """One training row and every request (and feedback entry) it came from."""

    record: Record
    kind: str  # correction (a user's correction) or positive (an accepted answer)
    request_ids: list[str] = field(default_factory=list)
    feedback_ids: list[int] = field(default_factory=list)


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    row_key: str  # the key of the row its correction became
    request_ids: list[str] = field(default_factory=list)
    feedback_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Decision:
    answer: str
    kind: Literal["correction", "positive"]
    rejected: str | None  # the logged answer a correction replaced (a preference pair)


def _decide(req: LoggedRequest, entries: list[FeedbackEntry], policy: FeedbackSpec) -> _Decision | str:
    """What one request's feedback makes (its latest correction and latest rating decide), or why
    it makes nothing."""
    correction = next((e.correction.strip() for e in reversed(entries) if e.correction and e.correction.strip()), None)
    rating = next((e.rating for e in reversed(entries) if e.rating is not None), None)
    if correction is not None:
        if not policy.corrections:
            return "corrections_off"
        answer = (req.response or "").strip()
        return _Decision(correction, "correction", answer if answer and answer != correction else None)
    if rating is not None and rating >= policy.min_positive_rating:
        if not policy.accepted_as_positive:
            return "positive_not_accepted"
        if not (req.response or "").strip():
            return "no_answer"
        return _Decision((req.response or "").strip(), "positive", None)
    if rating is not None and rating <= policy.max_negative_rating:
        return "rejected_without_correction"
    return "no_correction_not_positive"


@dataclass
class Harvested:
    """The rows and pairs made from feedback, and every entry skipped, by reason."""

    rows: dict[str, HarvestRow] = field(default_factory=dict)  # by row key (the record as JSON)
    pairs: dict[str, PreferencePair] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> feedback entries
    feedback_ids: set[int] = field(default_factory=set)  # every entry looked at (rows made or skipped)
    already_harvested: int = 0
    other_models: int = 0

    def skip(self, reason: str, entries: list[FeedbackEntry]) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + len(entries)
        self.feedback_ids.update(e.id for e in entries)


def _row_key(record: Record) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class _Scope:
    """What a harvest takes: the model, its task, the feedback policy, the known labels, and the
    feedback ids harvested before (skipped as already harvested)."""

    model: str
    task_type: str
    policy: FeedbackSpec
    labels: frozenset[str] | None  # classification only
    done: frozenset[int]


def collect(entries: list[FeedbackEntry], requests: dict[str, LoggedRequest], scope: _Scope) -> Harvested:
    """Group the feedback by request and turn each request's into a row (or a reason it did not)."""
    out = Harvested()
    by_request: dict[str, list[FeedbackEntry]] = {}
    for e in entries:
        by_request.setdefault(e.response_id, []).append(e)
    for rid, group in by_request.items():
        req = requests.get(rid)
        if req is None:
            out.skip("no_such_request", group)
        elif req.model_name != scope.model:
            out.other_models += len(group)
        elif all(e.id in scope.done for e in group):
            out.already_harvested += len(group)
        else:
            _add_request(out, req, group, scope)
    return out


def _add_request(out: Harvested, req: LoggedRequest, group: list[FeedbackEntry], scope: _Scope) -> None:
    decision = _decide(req, group, scope.policy)
    if isinstance(decision, str):
        return out.skip(decision, group)
    prompt = prompt_messages(req.prompt)
    record = task_record(scope.task_type, prompt, decision.answer) if prompt else None
    if prompt is None or record is None:
        return out.skip("no_input", group)
    if scope.labels is not None and decision.answer not in scope.labels:
        return out.skip("unknown_label", group)
    key = _row_key(record)
    row = out.rows.setdefault(key, HarvestRow(record, decision.kind))
    row.request_ids.append(req.id)
    row.feedback_ids.extend(e.id for e in group)
    out.feedback_ids.update(e.id for e in group)
    if decision.rejected is not None:
        pair_key = json.dumps([prompt, decision.answer, decision.rejected], sort_keys=True, ensure_ascii=False)
        pair = out.pairs.setdefault(pair_key, PreferencePair(prompt, decision.answer, decision.rejected, key))
        pair.request_ids.append(req.id)
        pair.feedback_ids.extend(e.id for e in group)
    return None


# ---------------------------------------------------------------------- the harvest


class RequestSpan(TypedDict):
    """The requests a harvest's rows came from: first and last by time, and how many."""

    first: str | None
    last: str | None
    first_at: str | None
    last_at: str | None
    count: int


@dataclass
class HarvestResult:
    model: str
    version: str | None  # the dataset version holding the rows (None: nothing harvested yet)
    created: bool  # False: no new feedback made rows (the last harvest's version is returned)
    rows: int  # training rows of the version that came from this harvest's feedback
    request_ids: list[str]
    preference_pairs: int
    skipped: dict[str, int]  # reason -> feedback entries (curation drops prefixed "curation:")
    feedback: int  # feedback entries read
    already_harvested: int
    other_models: int  # feedback on other models' requests (not this harvest's)
    file: str | None  # the harvested rows as written, before curation
    version_path: str | None = None
    requests: RequestSpan | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class RowLink(TypedDict):
    """A training row (by index in the version's train split) and where it came from."""

    row: int
    request_ids: list[str]
    feedback_ids: list[int]
    kind: str  # correction, positive


class FeedbackLinks(TypedDict):
    """A dataset version's :data:`~tuneline.registry.FEEDBACK_LINKS` file."""

    model: str
    rows: list[RowLink]
    request_ids: list[str]  # every request a training row came from
    feedback_ids: list[int]  # every feedback entry looked at (rows made or skipped)
    harvests: list[str]  # the harvest versions the rows came through


@dataclass(frozen=True)
class HarvestedVersion:
    """A dataset version made by a harvest, with its sidecar and its row -> request links."""

    version: DatasetVersion
    info: dict[str, object]
    links: FeedbackLinks

    @property
    def feedback_ids(self) -> set[int]:
        return set(self.links["feedback_ids"])

    def row_links(self) -> dict[int, RowLink]:
        """Training row index -> its link."""
        return {r["row"]: r for r in self.links["rows"]}


def harvested_versions(ws: Workspace, model: str, kind: str = "harvest") -> list[HarvestedVersion]:
    """The dataset versions harvested from ``model``'s feedback (``kind`` "retrain": the merged
    versions retraining made), oldest first."""
    out = []
    for sidecar in sorted(ws.datasets_dir.glob(f"*/{HARVEST_FILE}")):
        info = json.loads(sidecar.read_text())
        links_file = sidecar.parent / FEEDBACK_LINKS
        if info.get("kind") != kind or info.get("model") != model or not links_file.is_file():
            continue
        out.append(HarvestedVersion(load_version(sidecar.parent.name, ws.datasets_dir), info,
                                    json.loads(links_file.read_text())))
    return sorted(out, key=lambda h: str(h.info.get("created", "")))


def known_labels(loaded: LoadedSpec) -> list[str] | None:
    """A classification spec's declared labels (``task.labels``): a correction outside them is
    counted as ``unknown_label``. Without declared labels (the label set is inferred from the
    training rows) a correction may name a new label: the intents users bring are what a retrained
    model must learn."""
    spec = loaded.spec
    if spec.task.type != "classification" or not spec.task.labels:
        return None
    return list(spec.task.labels)


def training_labels(loaded: LoadedSpec) -> list[str] | None:
    """A classification spec's label set: ``task.labels``, else those of its training file."""
    spec = loaded.spec
    if spec.task.type != "classification":
        return None
    if spec.task.labels:
        return list(spec.task.labels)
    src = spec.data.train
    read = read_records(loaded.resolve(src.path), src.resolved_format(), display=src.path)
    examples, _ = build_examples(spec.task, src, read.records)
    return sorted({ex.label for ex in examples if ex.label})


def _label_set(base: Sequence[str] | None, rows: Iterable[HarvestRow]) -> list[str] | None:
    """The harvest's label set: the model's labels and the new ones corrections named."""
    if base is None:
        return None
    return sorted({*base, *(str(r.record["label"]) for r in rows if r.record.get("label"))})


def harvest(loaded: LoadedSpec, workspace: Workspace, request_log: RequestLog, *, since: float | None = None,
            everything: bool = False, labels: Sequence[str] | None = None) -> HarvestResult:
    """Turn the feedback on the logged answers of the spec's model into a new dataset version.

    ``since``: only feedback created at or after this time (epoch seconds); ``everything``:
    harvest feedback already harvested into a version again; ``labels``: classification's label set
    before this harvest (default: :func:`training_labels`); corrections must name one of them only
    where the spec declares ``task.labels``."""
    spec, name = loaded.spec, loaded.spec.name
    declared = known_labels(loaded)
    labels = list(labels) if labels is not None else training_labels(loaded)
    before = harvested_versions(workspace, name)
    done = frozenset() if everything else frozenset(i for h in before for i in h.feedback_ids)
    entries, requests = read_log(request_log, since=since)
    scope = _Scope(name, spec.task.type, spec.monitor.feedback, frozenset(declared) if declared is not None else None,
                   done)
    got = collect(entries, requests, scope)
    result = HarvestResult(name, before[-1].version.id if before else None, False, 0, [], 0, dict(got.skipped),
                           len(entries), got.already_harvested, got.other_models, None)
    if not got.rows:
        return result
    file = _write_rows(workspace.feedback_dir(name), list(got.rows.values()))
    result.file = str(file)
    derived = derived_spec(loaded, {"train": file}, declared or _label_set(labels, got.rows.values()))
    try:
        curated = curate(derived, erased=load_filter(workspace))
    except DataError as exc:  # curation dropped every harvested row
        if exc.problems[0].field != "curation":
            raise
        result.skipped["curation: every row"] = sum(len(r.feedback_ids) for r in got.rows.values())
        return result
    rows = list(got.rows.values())
    line_of = {f"{file}:{i + 1}": i for i in range(len(rows))}
    for rej in curated.rejects:
        if rej.split == "train" and rej.where in line_of:
            reason = "curation: " + rej.reason.split(":", 1)[0]
            result.skipped[reason] = result.skipped.get(reason, 0) + len(rows[line_of[rej.where]].feedback_ids)
    version = save_version(curated, workspace.datasets_dir, spec.name, loaded.sha256)
    kept = [(i, rows[line_of[ex.where]]) for i, ex in enumerate(curated.splits["train"]) if ex.where in line_of]
    pairs = [p for p in got.pairs.values() if any(_row_key(r.record) == p.row_key for _, r in kept)]
    _write_pairs(version.path, pairs, Redactor(spec.curation.pii.types) if spec.curation.pii.policy != "off" else None)
    span = _span([requests[rid] for _, r in kept for rid in r.request_ids])
    write_links(version.path, name, kept, got.feedback_ids, [version.id])
    _write_sidecar(version.path, {"kind": "harvest", "model": name, "spec": spec.name, "spec_sha256": loaded.sha256,
                                  "created": _now(), "file": str(file), "requests": span, "rows": len(kept),
                                  "preference_pairs": len(pairs), "skipped": result.skipped})
    result.version, result.created, result.rows, result.version_path = version.id, True, len(kept), str(version.path)
    result.request_ids = sorted({rid for _, r in kept for rid in r.request_ids})
    result.preference_pairs, result.requests = len(pairs), span
    return result


def derived_spec(loaded: LoadedSpec, files: dict[str, Path], labels: Sequence[str] | None) -> LoadedSpec:
    """``loaded`` curating other files: ``files`` maps a data section (train, eval, test) to a
    JSONL file in the task's logical columns; no split is carved from the training rows (the
    given sections stay as they are); a classification task keeps ``labels`` as its label set.
    The spec file, and so every other relative path (golden sets), stays the same."""
    spec = loaded.spec
    data = spec.data.model_copy(update={k: DataSource(path=str(v), format="jsonl") for k, v in files.items()})
    split = spec.curation.split.model_copy(update={"validation": 0.0, "test": 0.0})
    curation = spec.curation.model_copy(update={"split": split})
    task = spec.task.model_copy(update={"labels": list(labels)}) if labels and spec.task.type == "classification" \
        else spec.task
    return LoadedSpec(spec.model_copy(update={"data": data, "curation": curation, "task": task}), loaded.path,
                      loaded.text)


def write_records(path: Path, records: Iterable[Record]) -> Path:
    """Rows as JSON lines (atomically)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _write_rows(folder: Path, rows: list[HarvestRow]) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = folder / f"harvest-{stamp}.jsonl"
    n = 1
    while path.exists():  # two harvests within a second
        n += 1
        path = folder / f"harvest-{stamp}-{n}.jsonl"
    return write_records(path, ({**r.record, "request_ids": r.request_ids, "feedback_ids": r.feedback_ids}
                                for r in rows))


def _write_pairs(folder: Path, pairs: list[PreferencePair], redactor: Redactor | None) -> None:
    """The version's :data:`PREFERENCES_FILE`, united with what an earlier harvest of the same
    version wrote (pairs with the same prompt, chosen and rejected answer are one, ids united)."""
    def clean(text: str) -> str:
        return redactor.redact(text)[0] if redactor is not None else text

    path = folder / PREFERENCES_FILE
    merged: dict[str, dict[str, object]] = {}
    known = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    fresh = [{"prompt": [{"role": m["role"], "content": clean(m["content"])} for m in p.prompt],
              "chosen": clean(p.chosen), "rejected": clean(p.rejected), "request_ids": p.request_ids,
              "feedback_ids": p.feedback_ids} for p in pairs]
    for pair in known + fresh:
        key = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True)
        if key in merged:
            for ids in ("request_ids", "feedback_ids"):
                merged[key][ids] = _united(merged[key][ids], pair[ids])
        else:
            merged[key] = pair
    write_records(path, merged.values())


def _united(a: object, b: object) -> list[str] | list[int]:
    items = [*(a if isinstance(a, list) else []), *(b if isinstance(b, list) else [])]
    return sorted(set(items), key=lambda x: (str(type(x)), x))


def write_links(folder: Path, model: str, rows: Sequence[tuple[int, HarvestRow]], feedback_ids: Iterable[int],
                harvests: list[str]) -> FeedbackLinks:
    """The version's :data:`~tuneline.registry.FEEDBACK_LINKS`: each training row (by index) with
    its request and feedback ids, every request id, every feedback id looked at, the harvest
    versions; united with what an earlier harvest of the same version wrote there."""
    path = folder / FEEDBACK_LINKS
    old: FeedbackLinks = json.loads(path.read_text()) if path.is_file() else {
        "model": model, "rows": [], "request_ids": [], "feedback_ids": [], "harvests": []}
    by_row = {r["row"]: r for r in old["rows"]}
    for i, r in rows:
        was = by_row.get(i)
        by_row[i] = {"row": i, "kind": r.kind,
                     "request_ids": sorted({*r.request_ids, *(was["request_ids"] if was else [])}),
                     "feedback_ids": sorted({*r.feedback_ids, *(was["feedback_ids"] if was else [])})}
    ordered = [by_row[i] for i in sorted(by_row)]
    links: FeedbackLinks = {
        "model": model, "rows": ordered,
        "request_ids": sorted({rid for r in ordered for rid in r["request_ids"]}),
        "feedback_ids": sorted({*old["feedback_ids"], *feedback_ids}),
        "harvests": sorted({*old["harvests"], *harvests})}
    atomic_write_text(path, json.dumps(links, indent=1) + "\n")
    return links


def write_sidecar(folder: Path, info: dict[str, object]) -> None:
    """The version's :data:`HARVEST_FILE` (kept when an earlier harvest made the same version)."""
    _write_sidecar(folder, info)


def _write_sidecar(folder: Path, info: dict[str, object]) -> None:
    path = folder / HARVEST_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def _span(requests: list[LoggedRequest]) -> RequestSpan:
    if not requests:
        return {"first": None, "last": None, "first_at": None, "last_at": None, "count": 0}
    ordered = sorted(requests, key=lambda r: (r.created, r.id))
    return {"first": ordered[0].id, "last": ordered[-1].id, "first_at": _iso(ordered[0].created),
            "last_at": _iso(ordered[-1].created), "count": len({r.id for r in ordered})}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _now() -> str:
    return _iso(time.time())


__all__ = ["HARVEST_FILE", "PREFERENCES_FILE", "FeedbackEntry", "FeedbackError", "HarvestResult",
           "HarvestRow", "HarvestedVersion", "LoggedRequest", "collect", "derived_spec",
           "example_record", "harvest", "harvested_versions", "known_labels", "prompt_messages", "training_labels",
           "read_log", "task_record", "write_links", "write_records", "write_sidecar"]
