"""The audit trail: an append-only, hash-chained log of every action that changed state.

Each entry holds the time, the actor (``user:<OS user>`` or ``key:<API key name>``, never a
secret), the action (``data.prepare``, ``run``, ``promote``, ...), what it acted on (``subject``),
its inputs and outputs by content hash or id, its result, and a few details (counts, a reason;
never erased content). Entries are numbered 1, 2, 3, ... and each holds the hash of the one before
(``prev``), and its own hash over all of that (``hash``), so:

- an **edited** entry no longer matches its hash;
- a **deleted**, **inserted** or **moved** entry breaks the number sequence or the next entry's
  ``prev``;
- entries **cut off the end** no longer match the head (the last number and hash, kept in its own
  table and updated with every append).

:meth:`AuditTrail.verify` walks the chain and names the first broken link. Someone who can write
the database can still rewrite the whole chain from a point on, including the head: keep a copy of
the head hash elsewhere (``tuneline audit log --head``, a ticket, the registry) to pin it.

The store is any SQLAlchemy URL: SQLite in the workspace (``audit.db``) by default, PostgreSQL for
a team (``$TUNELINE_AUDIT_URL``). Two writers never share a number: the number is the primary key,
so a concurrent append fails and is retried on the new end of the chain.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from tuneline.errors import Problem, TunelineError
from tuneline.runtime.sql import create_racing

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Engine

AUDIT_URL_ENV = "TUNELINE_AUDIT_URL"
ACTOR_ENV = "TUNELINE_ACTOR"  # who acts, when the OS user is not the person (a CI job names itself)
GENESIS = "0" * 64  # the ``prev`` of entry 1
RESULT_OK = "ok"
RESULT_FAILED = "failed"
RESULT_REFUSED = "refused"  # the action was asked for and declined (gates failed, no key)
RESULT_INTERRUPTED = "interrupted"
_APPEND_TRIES = 50



class _Tables(NamedTuple):
    entries: Table
    head: Table  # one row: the last entry's number and hash


@cache
def _tables() -> _Tables:
    """The audit tables (SQLAlchemy is imported on first use: `tuneline --help` does not pay for it)."""
    from sqlalchemy import (  # lazy: ~0.1 s, not at --help time
        Column,
        Integer,
        MetaData,
        String,
        Table,
        Text,
    )

    meta = MetaData()
    entries = Table(
        "audit_entries", meta,
        Column("seq", Integer, primary_key=True, autoincrement=False),
        Column("at", String(40), nullable=False),
        Column("actor", String(200), nullable=False),
        Column("action", String(100), nullable=False, index=True),
        Column("subject", String(500), nullable=False),
        Column("inputs", Text, nullable=False),
        Column("outputs", Text, nullable=False),
        Column("result", String(40), nullable=False),
        Column("details", Text, nullable=False),
        Column("prev", String(64), nullable=False),
        Column("hash", String(64), nullable=False),
    )
    head = Table(
        "audit_head", meta,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("seq", Integer, nullable=False),
        Column("hash", String(64), nullable=False),
    )
    return _Tables(entries, head)


class AuditError(TunelineError):
    """The audit store cannot be opened or written."""


@dataclass(frozen=True)
class Entry:
    """One audit entry, as stored. ``inputs``/``outputs``: name -> content hash or id."""

    seq: int
    at: str
    actor: str
    action: str
    subject: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    result: str
    details: dict[str, Any]
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mentions(self, ref: str) -> bool:
        """Whether ``ref`` (a run id, dataset version, ``NAME/VERSION``, ...) is this entry's subject,
        or one of its input or output values."""
        return ref == self.subject or ref in self.inputs.values() or ref in self.outputs.values()


@dataclass(frozen=True)
class Verification:
    """What :meth:`AuditTrail.verify` found: ``broken`` is None when the chain is whole, else the
    first broken link in words; ``seq`` the entry number where it was found."""

    entries: int
    head: str | None
    broken: str | None = None
    seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None


def entry_hash(seq: int, at: str, actor: str, action: str, subject: str, inputs: dict[str, str],  # noqa: PLR0913
               outputs: dict[str, str], result: str, details: dict[str, Any], prev: str) -> str:
    """SHA-256 over an entry's fields and its predecessor's hash, as canonical JSON."""
    body = {"seq": seq, "at": at, "actor": actor, "action": action, "subject": subject, "inputs": inputs,
            "outputs": outputs, "result": result, "details": details, "prev": prev}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def os_actor() -> str:
    """``$TUNELINE_ACTOR`` when set (a CI job, a service), else ``user:<OS user>``."""
    if named := os.environ.get(ACTOR_ENV, "").strip():
        return named
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"user:uid-{os.getuid()}"


def key_actor(key_name: str) -> str:
    """The actor of an API call: the key's name from the keys file (never the key)."""
    return f"key:{key_name}"


@dataclass
class Pending:
    """An action in progress (:meth:`AuditTrail.action`): fill in its outputs and details; the
    entry is appended when the block ends, with its result."""

    action: str
    subject: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    result: str = RESULT_OK
    entry: Entry | None = None


class AuditTrail:
    """The audit trail at the SQLAlchemy ``url`` (see the module docstring)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine  # lazy: see _tables
        from sqlalchemy.engine import make_url  # lazy: see _tables
        from sqlalchemy.exc import OperationalError  # lazy: see _tables

        u = make_url(url)
        self.url = u.render_as_string(hide_password=True)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if u.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: Engine = create_engine(u, **kwargs)
        try:
            create_racing(lambda: _tables().entries.metadata.create_all(self.engine))  # two machines' first commands
        except OperationalError as exc:
            raise AuditError(Problem(f"cannot open the audit trail at {self.url}: {exc.orig}",
                                     hint=f"check the URL (${AUDIT_URL_ENV}) and that the database is reachable")) from exc

    @classmethod
    def at(cls, default_url: str) -> AuditTrail:
        """``$TUNELINE_AUDIT_URL`` when set (a team's shared store), else ``default_url`` (the workspace's)."""
        return cls(os.environ.get(AUDIT_URL_ENV) or default_url)

    def close(self) -> None:
        self.engine.dispose()

    # ---- writing

    def append(self, action: str, *, subject: str = "", inputs: dict[str, str] | None = None,  # noqa: PLR0913
               outputs: dict[str, str] | None = None, result: str = RESULT_OK,
               details: dict[str, Any] | None = None, actor: str | None = None) -> Entry:
        """Append one entry at the end of the chain and return it."""
        values = {"actor": actor or os_actor(), "action": action, "subject": subject,
                  "inputs": {k: str(v) for k, v in (inputs or {}).items()},
                  "outputs": {k: str(v) for k, v in (outputs or {}).items()},
                  "result": result, "details": json.loads(_canonical(details or {}))}
        from sqlalchemy.exc import IntegrityError, OperationalError  # lazy: see _tables

        for attempt in range(_APPEND_TRIES):
            try:
                return self._append_once(values)
            except (IntegrityError, OperationalError):  # another writer took the number, or held the lock
                if attempt == _APPEND_TRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _append_once(self, values: dict[str, Any]) -> Entry:
        from sqlalchemy import insert, select, update  # lazy: see _tables

        _entries, _head = _tables()
        with self.engine.begin() as conn:
            last = conn.execute(select(_entries.c.seq, _entries.c.hash).order_by(_entries.c.seq.desc()).limit(1)).first()
            seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
            at = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            digest = entry_hash(seq, at, prev=prev, **values)
            conn.execute(insert(_entries).values(
                seq=seq, at=at, actor=values["actor"], action=values["action"], subject=values["subject"],
                inputs=_canonical(values["inputs"]), outputs=_canonical(values["outputs"]), result=values["result"],
                details=_canonical(values["details"]), prev=prev, hash=digest))
            moved = conn.execute(update(_head).where(_head.c.id == 1).values(seq=seq, hash=digest)).rowcount
            if not moved:
                conn.execute(insert(_head).values(id=1, seq=seq, hash=digest))
        return Entry(seq, at, prev=prev, hash=digest, **values)

    @contextmanager
    def action(self, action: str, *, subject: str = "", inputs: dict[str, str] | None = None,
               actor: str | None = None) -> Iterator[Pending]:
        """Record an action when its block ends: ``ok``, or ``failed`` with the error's type (not its
        message, which may quote data), or ``interrupted``; set ``pending.result`` to say ``refused``."""
        pending = Pending(action, subject, dict(inputs or {}))
        try:
            yield pending
        except KeyboardInterrupt:
            pending.result = RESULT_INTERRUPTED
            raise
        except BaseException as exc:
            pending.result = RESULT_FAILED
            pending.details.setdefault("error", type(exc).__name__)
            raise
        finally:
            pending.entry = self.append(pending.action, subject=pending.subject, inputs=pending.inputs,
                                        outputs=pending.outputs, result=pending.result, details=pending.details,
                                        actor=actor)

    # ---- reading

    def entries(self, *, since: str | None = None, action: str | None = None,
                refs: Iterable[str] | None = None) -> list[Entry]:
        """Entries in chain order; ``since``: an ISO date or time (entries at or after it);
        ``action``: that action or its sub-actions (``data`` matches ``data.forget``); ``refs``:
        entries that mention any of them (:meth:`Entry.mentions`)."""
        from sqlalchemy import or_, select  # lazy: see _tables

        _entries = _tables().entries
        q = select(_entries).order_by(_entries.c.seq)
        if since:
            q = q.where(_entries.c.at >= normalize_since(since))
        if action:  # the action or its sub-actions, in the database (the trail only grows)
            q = q.where(or_(_entries.c.action == action, _entries.c.action.startswith(action + ".", autoescape=True)))
        with self.engine.connect() as conn:
            rows = [_entry(r) for r in conn.execute(q).mappings()]
        if refs is not None:
            wanted = [r for r in refs if r]
            rows = [e for e in rows if any(e.mentions(r) for r in wanted)]
        return rows

    def head(self) -> tuple[int, str] | None:
        """The recorded head: the last entry's number and hash (None: no entry yet)."""
        from sqlalchemy import select  # lazy: see _tables

        _head = _tables().head
        with self.engine.connect() as conn:
            row = conn.execute(select(_head.c.seq, _head.c.hash).where(_head.c.id == 1)).first()
        return (row.seq, row.hash) if row else None

    def verify(self) -> Verification:
        """Walk the chain from entry 1 and name the first broken link (see the module docstring)."""
        from sqlalchemy import select  # lazy: see _tables

        _entries = _tables().entries
        with self.engine.connect() as conn:
            rows = list(conn.execute(select(_entries).order_by(_entries.c.seq)).mappings())
        head = self.head()
        return verify_rows(rows, head)


def verify_rows(rows: list[Any], head: tuple[int, str] | None) -> Verification:
    """Check stored rows (mappings with the table's columns, in number order) against each other and
    the recorded head."""
    prev_hash, prev_seq = GENESIS, 0
    for row in rows:
        try:
            e = _entry(row)
        except (ValueError, TypeError) as exc:
            return Verification(len(rows), None, f"entry {row['seq']} cannot be read ({exc}): it was edited", row["seq"])
        if e.seq != prev_seq + 1:
            what = (f"entries {prev_seq + 1}..{e.seq - 1} are missing: deleted" if e.seq > prev_seq + 1
                    else f"entry {e.seq} comes after entry {prev_seq}: renumbered")
            return Verification(len(rows), None, f"broken link after entry {prev_seq}: {what}", e.seq)
        if e.prev != prev_hash:
            return Verification(len(rows), None,
                                f"broken link between entries {prev_seq} and {e.seq}: entry {e.seq} does not hold "
                                f"entry {prev_seq}'s hash (an entry was deleted, inserted, reordered or edited there)",
                                e.seq)
        if _recomputed(e) != e.hash:
            return Verification(len(rows), None, f"entry {e.seq} does not match its hash: it was edited", e.seq)
        prev_hash, prev_seq = e.hash, e.seq
    last = (prev_seq, prev_hash) if rows else None
    if head is not None and last != head:
        if last is None or head[0] > last[0]:
            where = f"entries {(last or (0, ''))[0] + 1}..{head[0]} were cut off the end"
        else:
            where = f"entries after {head[0]} were added outside tuneline, or the head was changed"
        return Verification(len(rows), None, f"the chain does not end at the recorded head (entry {head[0]}): {where}",
                            head[0])
    if head is None and rows:
        return Verification(len(rows), None, "the recorded head is missing: it was deleted", None)
    return Verification(len(rows), prev_hash if rows else None)


def _recomputed(e: Entry) -> str:
    return entry_hash(e.seq, e.at, e.actor, e.action, e.subject, e.inputs, e.outputs, e.result, e.details, e.prev)


def _entry(row: Any) -> Entry:
    return Entry(seq=int(row["seq"]), at=row["at"], actor=row["actor"], action=row["action"], subject=row["subject"],
                 inputs=json.loads(row["inputs"]), outputs=json.loads(row["outputs"]), result=row["result"],
                 details=json.loads(row["details"]), prev=row["prev"], hash=row["hash"])


def normalize_since(since: str) -> str:
    """``2026-11-30`` or ``2026-11-30T08:00`` (UTC) as the stored timestamps' form, for comparison."""
    text = since.strip().removesuffix("Z")
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%d %H:%M"):
        try:
            parsed = datetime.strptime(text, fmt)  # noqa: DTZ007 - read as UTC, like the stored times
        except ValueError:
            continue
        return parsed.isoformat(timespec="microseconds") + "Z"
    raise AuditError(Problem(f"cannot read {since!r} as a date or time", field="--since",
                             hint="use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)"))
