"""The monitor store (the request log): every request and response, PII redacted, with model
version, latency, token counts, status and, for a classification adapter, the label it
predicted; requests refused before an answer too (429, 4xx, 5xx: no response); feedback
(ratings, corrections) on logged responses; and what monitoring makes of them: each check's
result (``checks``) and the alerts sent (``alerts``, one per detector per window). SQLite by
default, any SQLAlchemy URL for a team. A database made by an older tuneline gets the columns it
lacks when it is opened.

The server writes requests through :meth:`RequestLog.log`; the monitor reads them with
:meth:`RequestLog.requests` and :meth:`RequestLog.feedback`, stores checks with
:meth:`RequestLog.save_check` and claims alerts with :meth:`RequestLog.claim_alert`.

Logging never slows or fails a request. :meth:`RequestLog.log` only copies its
:class:`RequestRecord` onto a queue; a writer thread redacts each row (every message's text on its own, before anything is
JSON-encoded, so escaping cannot hide PII from the redactor) and writes rows in batches, one
transaction per batch. When the database cannot take a batch (unreachable, locked, table
missing), its rows, already redacted, are appended to a spool file (JSON lines, fsynced) and
counted; the writer retries the database with a growing pause (and once more at
:meth:`~RequestLog.close`) and moves the spooled rows into it when it works again. A row's id is
the table's primary key and rows already in the table are skipped, so a row is stored once
however often it is retried. Only when the spool cannot be written either are rows held in
memory (``held`` in :meth:`~RequestLog.stats`) until one of the two works.

The spool is ``<database file>.spool.jsonl`` next to a SQLite database, else
``tuneline-requests-<hash of the URL>.spool.jsonl`` in the folder given as ``spool_dir`` (or the
current directory for other databases). A spool left by an earlier process is recovered at start.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeAlias, TypedDict, cast

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    exists,
    func,
    insert,
    inspect,
    make_url,
    or_,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import ColumnElement, Executable

from tuneline.curation.pii import Redactor, redact_json
from tuneline.monitor.results import CheckResult, DetectorResult, Window
from tuneline.runtime.sql import create_racing

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per spool
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

metadata = MetaData()
requests_table = Table(
    "requests", metadata,
    Column("id", String(64), primary_key=True),
    Column("created", Float, nullable=False),
    Column("endpoint", String(64)),
    Column("model", String(200)),  # as requested: NAME, NAME@candidate, NAME@3
    Column("model_name", String(200)),
    Column("model_version", Integer, nullable=True),  # None: the base model
    Column("key_name", String(200), nullable=True),
    Column("prompt", Text),  # JSON, PII redacted
    Column("response", Text, nullable=True),  # PII redacted
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("status", Integer),
    Column("pii_redacted", Integer, default=0),
    # a classification adapter's answer as the label it predicts (None: another task, or no answer)
    Column("predicted_label", String(200), nullable=True),
)
feedback_table = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("response_id", String(64), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("rating", Integer, nullable=True),
    Column("correction", Text, nullable=True),
    Column("comment", Text, nullable=True),
)
checks_table = Table(  # one row per `tuneline monitor check`: its CheckResult, whole, as JSON
    "checks", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False, index=True),
    Column("version", Integer, nullable=True),
    Column("at", Float, nullable=False),
    Column("window_start", Float, nullable=False),
    Column("window_end", Float, nullable=False),
    Column("window_requests", Integer, nullable=False),
    Column("fired", Integer, nullable=False),  # detectors that fired
    Column("result", Text, nullable=False),  # CheckResult.to_dict() as JSON
)
alerts_table = Table(  # alerts sent: at most one per (model, detector) and window
    "alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False),
    Column("detector", String(200), nullable=False),
    Column("window_start", Float, nullable=False),
    Column("window_end", Float, nullable=False),
    Column("at", Float, nullable=False),
    Column("payload", Text, nullable=False),
    Index("alerts_by_detector", "model", "detector", "window_end"),
)
alert_locks_table = Table(  # one row per (model, detector): claims of its alerts take turns on it
    "alert_locks", metadata,
    Column("model", String(200), primary_key=True),
    Column("detector", String(200), primary_key=True),
    Column("claims", Integer, nullable=False),
)

# String columns with a length: longer values are cut, so no row can make a batch fail on a
# database that enforces lengths (and then fail every retry).
_LENGTHS = {c.name: c.type.length for c in requests_table.columns
            if isinstance(c.type, String) and not isinstance(c.type, Text) and c.type.length}
_REQUEST_COLUMNS = tuple(c.name for c in requests_table.columns)
_INTS = ("model_version", "prompt_tokens", "completion_tokens", "status")
_ID_CHUNK = 500  # ids per "already stored?" query (SQLite allows 999 parameters)
REDACTION_FAILED = "<redaction failed>"
PRUNE_BATCH = 500  # rows per transaction of RequestLog.prune
PRUNE_PAUSE = 0.01  # seconds between two of its batches


# A row as stored (and spooled): column name -> value, prompt and response redacted.
StoredRow: TypeAlias = dict[str, str | int | float | None]
# What a request sent: a conversation (messages) or a completion prompt.
LoggedPrompt: TypeAlias = str | list[dict[str, str]]


@dataclass(frozen=True)
class RequestRecord:
    """One answered (or failed) request, as the server hands it to :meth:`RequestLog.log`; the
    columns of ``requests`` besides ``created`` (the time it is logged) and ``pii_redacted``.
    A request refused before it was answered has no prompt (None) when its body was not read."""

    id: str
    endpoint: str
    model: str | None  # as requested: NAME, NAME@candidate, NAME@3 (None: refused before it was read)
    model_name: str | None
    model_version: int | None  # None: the base model (or not resolved)
    key_name: str | None
    prompt: LoggedPrompt | None
    response: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    latency_ms: float | None
    status: int
    predicted_label: str | None = None


class StoredRequest(TypedDict):
    """A row of ``requests`` as :meth:`RequestLog.requests` returns it (``prompt``: the redacted
    prompt as stored, JSON text; None for a request refused before its body was read)."""

    id: str
    created: float
    endpoint: str | None
    model: str | None
    model_name: str | None
    model_version: int | None
    key_name: str | None
    prompt: str | None
    response: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    latency_ms: float | None
    status: int | None
    pii_redacted: int | None
    predicted_label: str | None


class FeedbackRow(TypedDict):
    """A row of ``feedback``: a rating and/or correction of the response ``response_id``."""

    id: int
    response_id: str
    created: float
    rating: int | None
    correction: str | None
    comment: str | None


class AlertRow(TypedDict):
    """A row of ``alerts``: one alert sent (``payload``: what was sent, as its sender wrote it)."""

    id: int
    model: str
    detector: str
    window_start: float
    window_end: float
    at: float
    payload: str


class RequestLogError(RuntimeError):
    """The request log's database could not be read or written (feedback, lookups)."""


class _Flush:
    """A marker on the queue: set once every row queued before it is written or spooled."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class _Stop:
    """The marker that stops the writer (after it has written what came before)."""


_STOP = _Stop()
_Queued: TypeAlias = tuple[float, RequestRecord] | _Flush | _Stop  # (time logged, record) or a marker
_OPEN: weakref.WeakSet[RequestLog] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # rows still queued when the interpreter exits are written first
    for rl in list(_OPEN):
        rl.close(timeout=10)


class RequestLog:
    """Request and feedback log at the SQLAlchemy ``url``; see the module docstring.

    ``spool_dir``: where rows go when the database fails (default: next to a SQLite file, else
    the current directory). ``retry_seconds`` is the first pause before the database is tried
    again after a failure (doubling up to ``max_retry_seconds``); ``db_timeout`` is how long
    SQLite waits for a lock before a write counts as failed.
    """

    def __init__(self, url: str, spool_dir: str | Path | None = None, *, batch_size: int = 256,
                 retry_seconds: float = 1.0, max_retry_seconds: float = 30.0, db_timeout: float = 5.0) -> None:
        u = make_url(url)
        self.url = u.render_as_string(hide_password=True)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        memory = u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")
        if u.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": db_timeout, "check_same_thread": False}
            if memory:  # one in-memory database shared by the writer and the readers
                kwargs["poolclass"] = StaticPool
        self.engine = create_engine(u, **kwargs)
        tag = hashlib.sha256(url.encode()).hexdigest()[:12]
        self._spool_dir_given = spool_dir is not None
        if spool_dir is not None:
            self.spool_path = Path(spool_dir).absolute() / f"tuneline-requests-{tag}.spool.jsonl"
        elif u.get_backend_name() == "sqlite" and not memory and not str(u.database).startswith("file:"):
            db = Path(str(u.database)).absolute()
            self.spool_path = db.with_name(db.name + ".spool.jsonl")
        else:
            self.spool_path = Path.cwd() / f"tuneline-requests-{tag}.spool.jsonl"
        self.redactor = Redactor()
        self.batch_size = batch_size
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds

        self._db_lock = threading.Lock()  # one write at a time from this process
        # the one connection of an in-memory database is shared: reads take the lock too
        self._read_lock: AbstractContextManager[object] = self._db_lock if memory else contextlib.nullcontext()
        self._state = threading.Lock()  # counters and pending ids
        self._thread_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: set[str] = set()  # ids logged but not yet in the database
        self._counts = {"queued": 0, "written": 0, "spooled": 0, "failed": 0, "held": 0, "recovered": 0,
                        "in_spool": 0, "db_errors": 0}
        # writer thread only:
        self._held: list[StoredRow] = []  # rows neither the database nor the spool took
        self._pause = retry_seconds
        self._next_try = 0.0
        self._db_ok = False

        try:
            self._ensure_tables()
        except Exception as exc:
            log.warning("request log: database %s not reachable (%s); rows are spooled to %s until it is",
                        self.url, _short(exc), self.spool_path)
            self._db_failed()
        self._load_spool_ids()
        _OPEN.add(self)
        self._start()

    # ------------------------------------------------------------------ the interface

    def redact(self, text: str | None) -> tuple[str | None, int]:
        if text is None:
            return None, 0
        new, found = self.redactor.redact(text)
        return new, sum(found.values())

    def log(self, record: RequestRecord) -> None:
        """Queue one request's row; returns at once and never raises. Its prompt's containers are
        copied, so a caller changing its messages afterwards cannot change what is logged."""
        try:
            item = (time.time(), replace(record, prompt=_snapshot(record.prompt)))
            with self._state:
                self._pending.add(str(record.id))
                self._counts["queued"] += 1
            self._queue.put(item)
            self._start()
        except Exception:  # never let logging fail a request
            log.exception("request log: could not queue request %r", getattr(record, "id", None))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued so far is written or spooled. False on timeout, or when
        some rows could be neither written nor spooled (they stay queued in memory)."""
        marker = _Flush()
        self._queue.put(marker)
        self._start()
        return marker.done.wait(timeout) and marker.ok

    def close(self, timeout: float | None = None) -> None:
        """Write (or spool) everything queued, try the database once more for spooled rows, and
        stop the writer. A later :meth:`log` starts it again."""
        with self._thread_lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                self._thread = None
                return
            self._queue.put(_STOP)
        thread.join(timeout)
        if not thread.is_alive():
            with self._thread_lock:
                if self._thread is thread:
                    self._thread = None
            self.engine.dispose()

    def stats(self) -> dict[str, int]:
        """``queued`` (waiting), ``written`` (rows in the database, ``recovered`` of them from the
        spool or memory), ``failed`` (rows the database did not take at first), ``spooled`` (rows
        appended to the spool), ``in_spool`` (there now), ``held`` (in memory: spool unwritable),
        ``db_errors`` (failed database operations)."""
        with self._state:
            return dict(self._counts)

    def exists(self, response_id: str) -> bool:
        """Whether a response was logged: also true while its row is queued or spooled."""
        with self._state:
            if response_id in self._pending:
                return True
        try:
            with self._read_lock, self.engine.connect() as conn:
                found = conn.execute(select(requests_table.c.id).where(requests_table.c.id == response_id)).first()
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot look up {response_id!r}: {_short(exc)}") from exc
        return found is not None

    def add_feedback(self, response_id: str, rating: int | None, correction: str | None, comment: str | None) -> int:
        """Store feedback (PII redacted) and return its id; raises :class:`RequestLogError` when
        the database cannot take it."""
        correction, _ = self.redact(correction)
        comment, _ = self.redact(comment)
        try:
            with self._db_lock, self.engine.begin() as conn:
                res = conn.execute(insert(feedback_table).values(
                    response_id=response_id, created=time.time(), rating=rating,
                    correction=None if correction is None else _clean(correction),
                    comment=None if comment is None else _clean(comment)))
                key = res.inserted_primary_key
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot store feedback: {_short(exc)}") from exc
        assert key is not None
        return int(key[0])

    def rows(self, table: Table = requests_table) -> list[dict[str, Any]]:
        """Every row of ``table`` (after writing what is queued)."""
        self.flush()
        with self._read_lock, self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(table))]

    # ------------------------------------------------------------------ reading (the monitor)

    def requests(self, model_name: str | None = None, *, limit: int | None = None, since: float | None = None,
                 until: float | None = None) -> list[StoredRequest]:
        """The stored requests (every status) of ``model_name`` (all models: None) created between
        ``since`` and ``until`` (Unix times, both included), oldest first; with ``limit``, the
        newest ``limit`` of them. Rows still queued in this process are written first."""
        self.flush(timeout=30)
        t = requests_table
        q = select(t)
        if model_name is not None:
            q = q.where(t.c.model_name == model_name)
        if since is not None:
            q = q.where(t.c.created >= since)
        if until is not None:
            q = q.where(t.c.created <= until)
        newest_first = limit is not None
        q = q.order_by(t.c.created.desc(), t.c.id.desc()) if newest_first else q.order_by(t.c.created, t.c.id)
        if limit is not None:
            q = q.limit(max(0, limit))
        rows = [cast(StoredRequest, dict(r)) for r in self._read(q, "read requests")]
        return rows[::-1] if newest_first else rows

    def requests_by_id(self, ids: Collection[str]) -> dict[str, StoredRequest]:
        """The stored requests with these ids (those not stored are absent), by id."""
        self.flush(timeout=30)
        t, unique = requests_table, list(dict.fromkeys(ids))
        out: dict[str, StoredRequest] = {}
        for i in range(0, len(unique), _ID_CHUNK):
            q = select(t).where(t.c.id.in_(unique[i:i + _ID_CHUNK]))
            out.update((str(r["id"]), cast(StoredRequest, dict(r))) for r in self._read(q, "read requests"))
        return out

    def feedback(self, response_ids: Collection[str] | None = None, *,
                 since: float | None = None) -> list[FeedbackRow]:
        """Feedback (on the responses ``response_ids``, else on any) given at or after ``since``,
        oldest first."""
        t = feedback_table
        base = select(t).order_by(t.c.created, t.c.id)
        if since is not None:
            base = base.where(t.c.created >= since)
        if response_ids is None:
            queries = [base]
        else:
            ids = list(dict.fromkeys(response_ids))
            queries = [base.where(t.c.response_id.in_(ids[i:i + _ID_CHUNK])) for i in range(0, len(ids), _ID_CHUNK)]
        rows = [cast(FeedbackRow, dict(r)) for q in queries for r in self._read(q, "read feedback")]
        if len(queries) > 1:
            rows.sort(key=lambda r: (r["created"], r["id"]))
        return rows

    # ------------------------------------------------------------------ monitor checks and alerts

    def save_check(self, check: CheckResult) -> int:
        """Store a monitor check's result; returns its id."""
        values = {"model": check.model, "version": check.version, "at": check.at,
                  "window_start": check.window.start, "window_end": check.window.end,
                  "window_requests": check.window.requests, "fired": len(check.fired),
                  "result": json.dumps(check.to_dict(), ensure_ascii=False)}
        try:
            with self._db_lock, self.engine.begin() as conn:
                key = conn.execute(insert(checks_table).values(**values)).inserted_primary_key
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot store the check of {check.model!r}: "
                                  f"{_short(exc)}") from exc
        assert key is not None
        return int(key[0])

    def checks(self, model: str, *, since: float | None = None) -> list[CheckResult]:
        """The stored checks of ``model`` (at or after ``since``), oldest first."""
        t = checks_table
        q = select(t.c.result).where(t.c.model == model).order_by(t.c.at, t.c.id)
        if since is not None:
            q = q.where(t.c.at >= since)
        return [check_from_json(r["result"]) for r in self._read(q, f"read the checks of {model!r}")]

    def latest_check(self, model: str) -> CheckResult | None:
        """The last check of ``model`` (by its time), or None."""
        t = checks_table
        q = select(t.c.result).where(t.c.model == model).order_by(t.c.at.desc(), t.c.id.desc()).limit(1)
        rows = self._read(q, f"read the checks of {model!r}")
        return check_from_json(rows[0]["result"]) if rows else None

    def checked_models(self) -> list[str]:
        """Every model with a stored check."""
        q = select(checks_table.c.model).distinct().order_by(checks_table.c.model)
        return [str(r["model"]) for r in self._read(q, "read the checked models")]

    def claim_alert(self, model: str, detector: str, window_start: float, window_end: float, payload: str) -> bool:
        """Whether an alert of ``detector`` on ``model`` for this window should be sent: True, and
        the alert stored, unless one was stored already for a window that overlaps it (one alert
        per detector per window). Claims of one (model, detector) take turns on its row of
        ``alert_locks``, so of two processes claiming the same alert at once exactly one gets True."""
        for _ in range(5):
            try:
                return self._claim(model, detector, window_start, window_end, payload)
            except IntegrityError:  # another process made the lock row meanwhile: once more, in turn
                continue
            except Exception as exc:
                raise RequestLogError(f"request log {self.url}: cannot record the alert {detector!r} of "
                                      f"{model!r}: {_short(exc)}") from exc
        raise RequestLogError(f"request log {self.url}: cannot record the alert {detector!r} of {model!r}: "
                              "the lock row could not be made")

    def _claim(self, model: str, detector: str, window_start: float, window_end: float, payload: str) -> bool:
        locks, a = alert_locks_table, alerts_table
        with self._db_lock, self.engine.begin() as conn:
            # the first write takes the lock (SQLite: the database's; others: the row's) until commit
            taken = conn.execute(update(locks).where(locks.c.model == model, locks.c.detector == detector)
                                 .values(claims=locks.c.claims + 1)).rowcount
            if not taken:
                conn.execute(insert(locks).values(model=model, detector=detector, claims=1))
            overlap = conn.execute(select(a.c.id).where(
                a.c.model == model, a.c.detector == detector, a.c.window_end >= window_start,
                a.c.window_start <= window_end).limit(1)).first()
            if overlap is not None:
                return False
            conn.execute(insert(a).values(model=model, detector=detector, window_start=window_start,
                                          window_end=window_end, at=time.time(), payload=payload))
            return True

    def release_alert(self, model: str, detector: str, window_start: float) -> None:
        """Forget the alert claimed for this window (a sink failed to deliver it), so the next
        check claims and sends it again."""
        a = alerts_table
        try:
            with self._db_lock, self.engine.begin() as conn:
                conn.execute(delete(a).where(a.c.model == model, a.c.detector == detector,
                                             a.c.window_start == window_start))
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot release the alert {detector!r} of "
                                  f"{model!r}: {_short(exc)}") from exc

    def alerts_sent(self, model: str, *, since: float | None = None) -> list[AlertRow]:
        """The alerts stored for ``model`` (sent at or after ``since``), oldest first."""
        a = alerts_table
        q = select(a).where(a.c.model == model).order_by(a.c.at, a.c.id)
        if since is not None:
            q = q.where(a.c.at >= since)
        return [cast(AlertRow, dict(r)) for r in self._read(q, f"read the alerts of {model!r}")]

    def _read(self, query: Executable, what: str) -> list[RowMapping]:
        try:
            with self._read_lock, self.engine.connect() as conn:
                return list(conn.execute(query).mappings())
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot {what}: {_short(exc)}") from exc

    # ------------------------------------------------------------------ erasure (delete by match)

    def requests_matching(self, hits: Callable[[StoredRequest], bool]) -> list[str]:
        """The ids of the stored requests ``hits`` is true of (every row is read, in pages, after
        writing what is queued and moving spooled rows in)."""
        self.flush(timeout=30)
        t = requests_table
        return [str(r["id"]) for r in self._scan(select(t).order_by(t.c.id), "read requests")
                if hits(cast(StoredRequest, dict(r)))]

    def feedback_matching(self, hits: Callable[[FeedbackRow], bool],
                          response_ids: Collection[str] = ()) -> list[int]:
        """The ids of the feedback entries ``hits`` is true of, or on one of ``response_ids``."""
        t, on = feedback_table, set(response_ids)
        return [int(r["id"]) for r in self._scan(select(t).order_by(t.c.id), "read feedback")
                if r["response_id"] in on or hits(cast(FeedbackRow, dict(r)))]

    def delete_requests(self, ids: Collection[str]) -> int:
        """Delete these requests (their feedback is not touched: see :meth:`delete_feedback`);
        returns how many rows went."""
        return self._delete(requests_table, list(dict.fromkeys(ids)))

    def delete_feedback(self, ids: Collection[int]) -> int:
        """Delete these feedback entries; returns how many rows went."""
        return self._delete(feedback_table, list(dict.fromkeys(ids)))

    def compact(self) -> None:
        """Rewrite a SQLite database file so deleted rows leave no bytes behind (``VACUUM``); other
        databases reclaim their space themselves."""
        if self.engine.dialect.name != "sqlite":
            return
        try:
            with self._db_lock, self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sql_text("VACUUM"))
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot compact: {_short(exc)}") from exc

    def _scan(self, query: Executable, what: str, page: int = 1000) -> list[RowMapping]:
        try:
            with self._read_lock, self.engine.connect() as conn:
                return list(conn.execution_options(yield_per=page).execute(query).mappings())
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot {what}: {_short(exc)}") from exc

    def _delete(self, table: Table, ids: list[str] | list[int]) -> int:
        """Delete the rows of ``table`` with these ids (its ``id`` column), in chunks, in one transaction."""
        key, n = table.c.id, 0
        try:
            with self._db_lock, self.engine.begin() as conn:
                for i in range(0, len(ids), _ID_CHUNK):
                    n += conn.execute(delete(table).where(key.in_(ids[i:i + _ID_CHUNK]))).rowcount
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot delete from {table.name}: {_short(exc)}") from exc
        return n

    # ------------------------------------------------------------------ the writer

    def _start(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tuneline-request-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            wait = max(0.0, self._next_try - time.monotonic()) if self._behind() else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._guarded(self._recover)
                continue
            batch, markers, stop = self._take_batch(item)
            if batch:
                self._guarded(self._store, batch)
            if stop:
                self._last_try()
            for m in markers:
                m.ok = not self._held
                m.done.set()
            if stop:
                return

    def _take_batch(self, item: _Queued) -> tuple[list[tuple[float, RequestRecord]], list[_Flush], bool]:
        """``item`` and what else is queued now, up to ``batch_size`` rows or the stop marker:
        (rows, flush markers, whether to stop)."""
        batch: list[tuple[float, RequestRecord]] = []
        markers: list[_Flush] = []
        while True:
            if isinstance(item, _Stop):
                return batch, markers, True
            if isinstance(item, _Flush):
                markers.append(item)
            else:
                batch.append(item)
            if len(batch) >= self.batch_size:
                return batch, markers, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, markers, False

    def _last_try(self) -> None:
        """At close: the database once more for spooled rows, rows in memory to the spool."""
        self._guarded(self._recover, True)
        if self._held:
            self._guarded(self._spool_held)
        if self._held:
            log.error("request log: %d rows could be written neither to %s nor to %s and are lost "
                      "with this process", len(self._held), self.url, self.spool_path)

    def _guarded(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:  # the writer must not die; whatever failed stays spooled or held
            log.exception("request log: writer error")

    def _behind(self) -> bool:
        """Rows wait in the spool or in memory for the database."""
        return bool(self._held) or self._counts["in_spool"] > 0

    def _store(self, raw: list[tuple[float, RequestRecord]]) -> None:
        rows = [self._redact_row(created, record) for created, record in raw]
        with self._state:
            self._counts["queued"] -= len(raw)
        if self._behind():
            self._recover()
        if not self._behind() and time.monotonic() >= self._next_try:
            try:
                if not self._db_ok:
                    self._ensure_tables()
                self._write(rows)
                return
            except Exception as exc:
                log.warning("request log: cannot write %d rows to %s (%s); spooling them to %s",
                            len(rows), self.url, _short(exc), self.spool_path)
                self._db_failed()
        with self._state:
            self._counts["failed"] += len(rows)
        self._spool(rows)

    def _redact_row(self, created: float, record: RequestRecord) -> StoredRow:
        """The row to store: prompt and response redacted, every value of its column's type."""
        row: dict[str, Any] = {f.name: getattr(record, f.name) for f in fields(record)}
        row["created"] = created
        text: str | None
        try:
            if record.prompt is None:  # refused before its body was read
                text, n1 = None, 0
            else:
                prompt, n1 = redact_json(record.prompt, self.redactor)
                text = json.dumps(prompt, ensure_ascii=False)
        except Exception:
            log.exception("request log: could not redact the prompt of %r; storing a placeholder", record.id)
            text, n1 = json.dumps(REDACTION_FAILED), 0
        try:
            response, n2 = self.redact(None if record.response is None else str(record.response))
        except Exception:
            log.exception("request log: could not redact the response of %r; storing a placeholder", record.id)
            response, n2 = REDACTION_FAILED, 0
        row["prompt"], row["pii_redacted"] = None if text is None else _clean(text), n1 + n2
        row["response"] = None if response is None else _clean(response)
        for name, length in _LENGTHS.items():
            v = row.get(name)
            if v is not None:
                row[name] = _clean(str(v))[:length]
        for name in _INTS:
            try:
                row[name] = None if row[name] is None else int(row[name])
            except (TypeError, ValueError):
                row[name] = None
        for name in ("created", "latency_ms"):
            try:
                row[name] = None if row[name] is None else float(row[name])
            except (TypeError, ValueError):
                row[name] = None
        if row["created"] is None:
            row["created"] = time.time()
        return row

    def _write(self, rows: list[StoredRow]) -> int:
        """Insert the rows whose id is not stored yet, in one transaction; returns how many."""
        ids = list(dict.fromkeys(str(r["id"]) for r in rows))
        with self._db_lock, self.engine.begin() as conn:
            stored: set[str] = set()
            for i in range(0, len(ids), _ID_CHUNK):
                chunk = ids[i:i + _ID_CHUNK]
                stored.update(conn.execute(select(requests_table.c.id).where(requests_table.c.id.in_(chunk))).scalars())
            fresh: list[StoredRow] = []
            for r in rows:
                if str(r["id"]) not in stored:
                    stored.add(str(r["id"]))
                    fresh.append(_complete(r))
            if fresh:
                conn.execute(insert(requests_table), fresh)
        self._db_ok = True
        self._pause = self.retry_seconds
        self._next_try = 0.0
        with self._state:
            self._counts["written"] += len(fresh)
            self._pending.difference_update(ids)
        return len(fresh)

    def _db_failed(self) -> None:
        self._db_ok = False
        # pooled connections may be broken for good (a server restarted, an SQLite file replaced):
        # the next try opens new ones
        with contextlib.suppress(Exception):
            self.engine.dispose()
        self._next_try = time.monotonic() + self._pause
        self._pause = min(self._pause * 2, self.max_retry_seconds)
        with self._state:
            self._counts["db_errors"] += 1

    def _ensure_tables(self) -> None:
        with self._db_lock:
            create_tables(self.engine)

    # ------------------------------------------------------------------ spool and recovery

    def _spool(self, rows: list[StoredRow]) -> None:
        try:
            self._append_spool(rows)
        except OSError as exc:
            log.error("request log: cannot write the spool %s either (%s); holding %d rows in memory",
                      self.spool_path, _short(exc), len(rows))
            self._held.extend(rows)
            with self._state:
                self._counts["held"] = len(self._held)
            return
        with self._state:
            self._counts["spooled"] += len(rows)
            self._counts["in_spool"] += len(rows)

    def _spool_held(self) -> None:
        rows, self._held = self._held, []
        with self._state:
            self._counts["held"] = 0
        self._spool(rows)

    def _append_spool(self, rows: list[StoredRow]) -> None:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        if self._spool_dir_given:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _recover(self, force: bool = False) -> None:
        """Move rows held in memory and spooled rows into the database, if it works now."""
        if not self._behind() and self._db_ok:
            return
        if not force and time.monotonic() < self._next_try:
            return
        try:
            fd = os.open(self.spool_path, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        except OSError as exc:
            log.warning("request log: cannot open the spool %s: %s", self.spool_path, _short(exc))
            fd = -1
        try:
            spooled: list[StoredRow] = []
            if fd >= 0:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                spooled = self._read_spool(fd)
            try:
                self._ensure_tables()
                n = self._write(self._held + spooled)
            except Exception as exc:
                log.warning("request log: %s still failing (%s); next try in %.0f s", self.url, _short(exc),
                            self._pause)
                self._db_failed()
                return
            if fd >= 0:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            moved = len(self._held) + len(spooled)
            self._held = []
            with self._state:
                self._counts["recovered"] += n
                self._counts["in_spool"] = 0
                self._counts["held"] = 0
            if moved:
                log.warning("request log: %s works again; moved %d spooled rows into it (%d were there already)",
                            self.url, moved, moved - n)
        finally:
            if fd >= 0:
                os.close(fd)

    def _read_spool(self, fd: int) -> list[StoredRow]:
        chunks = []
        os.lseek(fd, 0, os.SEEK_SET)
        while block := os.read(fd, 1 << 20):
            chunks.append(block)
        rows, bad = [], []
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not a row")
                rows.append(row)
            except ValueError:
                bad.append(line)
        if bad:  # a line torn by a crash mid-write: kept aside for a person, not retried forever
            with open(self.spool_path.with_name(self.spool_path.name + ".bad"), "a") as f:
                f.write("".join(b + "\n" for b in bad))
            log.error("request log: %d unreadable lines of %s moved to %s.bad", len(bad), self.spool_path,
                      self.spool_path.name)
        return rows

    def _load_spool_ids(self) -> None:
        """Ids of rows a previous process spooled: they count as logged, and are recovered."""
        try:
            with open(self.spool_path, "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        ids = []
        for line in lines:
            try:
                ids.append(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                continue
        with self._state:
            self._pending.update(ids)
            self._counts["in_spool"] += len(ids)

    # ------------------------------------------------------------------ retention (`tuneline monitor prune`)
    # One block, kept at the end of the class: the pruning of old rows. ``before`` maps "requests",
    # "feedback" and "checks" to a cutoff (Unix time; rows created before it go) or None (kept).

    def prune(self, model_name: str, before: Mapping[str, float | None], *, dry_run: bool = False,
              batch_size: int = PRUNE_BATCH, counts: dict[str, int] | None = None) -> dict[str, int]:
        """Delete ``model_name``'s rows older than their cutoff in ``before``, and return how many
        per table (``requests``, ``feedback``, ``checks``, ``alerts``) and how many old requests
        were kept because feedback on them is still kept (``requests_kept_for_feedback``).

        - feedback on the model's requests created before ``before["feedback"]``;
        - the model's requests (and those that name no model: refused before their body was read)
          created before ``before["requests"]``, unless feedback on them is still kept: the feedback
          needs its prompt (a cutoff of None for feedback keeps every request that has feedback);
        - its checks made before ``before["checks"]``, except its latest (the server's gauges and
          the report read it), and its alerts sent before it whose window ended before its oldest
          remaining request (no later window can overlap them, so none is sent twice).

        Rows go in batches of ``batch_size``, one short transaction each, so the server keeps
        logging meanwhile. ``counts`` (when given) is updated after every batch: an error midway
        leaves in it what was deleted. ``dry_run``: count, delete nothing."""
        counts = {} if counts is None else counts
        for name in ("feedback", "requests", "requests_kept_for_feedback", "checks", "alerts"):
            counts[name] = 0
        batch = max(1, min(batch_size, _ID_CHUNK))
        try:
            self._prune_logged(model_name, before, dry_run, batch, counts)
            self._prune_checks(model_name, before, dry_run, batch, counts)
        except Exception as exc:
            raise RequestLogError(f"request log {self.url}: cannot prune the rows of {model_name!r}: "
                                  f"{_short(exc)}") from exc
        return counts

    def _prune_logged(self, model_name: str, before: Mapping[str, float | None], dry_run: bool, batch: int,
                      counts: dict[str, int]) -> None:
        r, f = requests_table, feedback_table
        of_model = or_(r.c.model_name == model_name, r.c.model_name.is_(None))
        feedback_cut = before.get("feedback")
        if feedback_cut is not None:
            old_feedback = and_(f.c.response_id.in_(select(r.c.id).where(of_model)), f.c.created < feedback_cut)
            self._prune_table(f, old_feedback, dry_run, batch, counts, "feedback")
        doomed = self._doomed_requests(model_name, before)
        if doomed is None:
            return
        self._prune_table(r, doomed, dry_run, batch, counts, "requests")
        old = and_(of_model, r.c.created < before["requests"])
        counts["requests_kept_for_feedback"] = self._count(r, and_(old, ~doomed))

    @staticmethod
    def _doomed_requests(model_name: str, before: Mapping[str, float | None]) -> ColumnElement[bool] | None:
        """The model's requests (and those naming no model) older than the cutoff that no kept
        feedback rates (None: requests are kept for ever)."""
        r, f = requests_table, feedback_table
        requests_cut, feedback_cut = before.get("requests"), before.get("feedback")
        if requests_cut is None:
            return None
        kept_feedback = f.c.response_id == r.c.id
        if feedback_cut is not None:
            kept_feedback = and_(kept_feedback, f.c.created >= feedback_cut)
        return and_(or_(r.c.model_name == model_name, r.c.model_name.is_(None)), r.c.created < requests_cut,
                    ~exists(select(f.c.id).where(kept_feedback)))

    def _prune_checks(self, model_name: str, before: Mapping[str, float | None], dry_run: bool, batch: int,
                      counts: dict[str, int]) -> None:
        c, a, r = checks_table, alerts_table, requests_table
        cutoff = before.get("checks")
        if cutoff is None:
            return
        latest = self._read(select(c.c.id).where(c.c.model == model_name)
                            .order_by(c.c.at.desc(), c.c.id.desc()).limit(1), "read the latest check")
        old_checks = and_(c.c.model == model_name, c.c.at < cutoff)
        if latest:
            old_checks = and_(old_checks, c.c.id != latest[0]["id"])
        self._prune_table(c, old_checks, dry_run, batch, counts, "checks")
        # the oldest request that stays (in a dry run too: the doomed ones do not count)
        staying = r.c.model_name == model_name
        doomed = self._doomed_requests(model_name, before)
        if doomed is not None:
            staying = and_(staying, ~doomed)
        oldest = self._read(select(func.min(r.c.created).label("oldest")).where(staying), "read the oldest request")
        floor = cutoff if not oldest or oldest[0]["oldest"] is None else min(cutoff, float(oldest[0]["oldest"]))
        old_alerts = and_(a.c.model == model_name, a.c.at < cutoff, a.c.window_end < floor)
        self._prune_table(a, old_alerts, dry_run, batch, counts, "alerts")

    def _prune_table(self, table: Table, condition: ColumnElement[bool], dry_run: bool, batch: int,  # noqa: PLR0913
                     counts: dict[str, int], name: str) -> None:
        if dry_run:
            counts[name] = self._count(table, condition)
            return
        key = table.c.id
        while True:
            with self._db_lock, self.engine.begin() as conn:
                ids = list(conn.execute(select(key).where(condition).order_by(key).limit(batch)).scalars())
                if ids:
                    conn.execute(delete(table).where(key.in_(ids)))
            counts[name] += len(ids)
            if len(ids) < batch:
                return
            time.sleep(PRUNE_PAUSE)  # between two batches: the server's writer takes its turn

    def _count(self, table: Table, condition: ColumnElement[bool]) -> int:
        rows = self._read(select(func.count().label("n")).select_from(table).where(condition),
                          f"count the rows of {table.name}")
        return int(rows[0]["n"]) if rows else 0


# ---------------------------------------------------------------------- helpers


def create_tables(engine: Engine, tries: int = 3) -> None:
    """The store's tables and columns, made where missing. Another process making them at the
    same moment ("table ... already exists") is not an error: the next try finds them."""
    def create() -> None:
        metadata.create_all(engine)
        add_missing_columns(engine)

    create_racing(create, tries)


def add_missing_columns(engine: Engine) -> list[str]:
    """Add to each table of the store the columns a database made by an older tuneline lacks
    (``ALTER TABLE ... ADD COLUMN``; every column added later is nullable); returns them as
    ``table.column``. A column another process adds meanwhile is not an error."""
    added = []
    quote = engine.dialect.identifier_preparer.quote
    for table in metadata.sorted_tables:
        with engine.connect() as conn:
            have = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = (f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} "
                   f"{column.type.compile(dialect=engine.dialect)}")
            try:
                with engine.begin() as conn:
                    conn.execute(sql_text(ddl))
            except Exception:
                with engine.connect() as conn:  # added by another process meanwhile?
                    if column.name not in {c["name"] for c in inspect(conn).get_columns(table.name)}:
                        raise
            else:
                log.warning("request log: added the column %s.%s to %s (made by an older tuneline)",
                            table.name, column.name, engine.url.render_as_string(hide_password=True))
            added.append(f"{table.name}.{column.name}")
    return added


def check_from_json(text: str) -> CheckResult:
    """A :class:`CheckResult` from what :meth:`RequestLog.save_check` stored (fields a newer
    tuneline added are ignored)."""
    data = json.loads(text)
    known = {cls: {f.name for f in fields(cls)} for cls in (Window, DetectorResult)}
    window = Window(**{k: v for k, v in data["window"].items() if k in known[Window]})
    results = [DetectorResult(**{k: v for k, v in r.items() if k in known[DetectorResult]})
               for r in data.get("results", [])]
    return CheckResult(model=data["model"], version=data.get("version"), dataset_version=data.get("dataset_version"),
                       at=float(data["at"]), window=window, results=results)


def _complete(row: StoredRow) -> StoredRow:
    """``row`` with exactly the columns of ``requests``: a row spooled by an older (or newer)
    tuneline may lack a column (stored as None) or carry one this table does not have."""
    out = {name: row.get(name) for name in _REQUEST_COLUMNS}
    if out["pii_redacted"] is None:
        out["pii_redacted"] = 0
    return out


def _snapshot(prompt: LoggedPrompt | None) -> LoggedPrompt | None:
    """A copy of the containers in ``prompt`` (strings are immutable), so a caller changing its
    messages after :meth:`RequestLog.log` returns cannot change what is logged."""
    return cast("LoggedPrompt | None", _copy(prompt))


def _copy(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_copy(v) for v in obj]
    return obj


def _clean(text: str) -> str:
    """Text any database stores: no NUL (PostgreSQL refuses it) and no lone surrogates (not
    encodable as UTF-8), each replaced."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
