"""``tuneline monitor prune``: the spec's ``monitor.retention`` enforced on the request log.

What is pruned (:func:`prune`): the model's requests older than ``requests_days`` (and the rows
that name no model: requests refused before their body was read, which carry no prompt), except
those whose feedback is still kept; the feedback on its requests older than ``feedback_days``; its
stored checks and alerts older than ``checks_days`` (its latest check always stays). Rows go in
short batches (:meth:`RequestLog.prune`), so a server logging into the same database waits at
most one batch. Every real prune is recorded in the audit trail as ``monitor.prune`` (by the CLI),
with the retention, the cutoffs and the counts, never a row's content.

Which spec applies (:func:`retention_target`): a spec file names the model and supplies the
retention (no registered version is needed: a retired model's rows can still be pruned); a
model's NAME uses the spec shipped with its production version, as ``monitor check`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline import registry
from tuneline.errors import Problem
from tuneline.monitor.check import MonitorError, shipped_spec
from tuneline.monitor.store import PRUNE_BATCH
from tuneline.spec import load_spec
from tuneline.spec.monitor import DAY_SECONDS, RetentionSpec

if TYPE_CHECKING:
    from tuneline.monitor.store import RequestLog
    from tuneline.workspace import Workspace

TABLES = ("requests", "feedback", "checks", "alerts")
_CUTOFF_OF = {"requests": "requests_days", "feedback": "feedback_days", "checks": "checks_days"}


@dataclass(frozen=True)
class RetentionTarget:
    """The model whose rows are pruned and the retention that applies."""

    name: str
    retention: RetentionSpec
    where: str  # the spec it came from: a file, or NAME@VERSION's shipped spec
    spec_sha256: str | None = None  # of the spec file given (None: the shipped one)


@dataclass
class PruneResult:
    """What a prune deleted (or, in a dry run, would delete)."""

    model: str
    retention: dict[str, float | None]
    cutoffs: dict[str, float | None]  # table group -> Unix time (rows before it go); None: kept
    at: float
    dry_run: bool
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def deleted(self) -> int:
        return sum(self.counts.get(t, 0) for t in TABLES)

    def cutoffs_utc(self) -> dict[str, str | None]:
        return {k: None if v is None else _iso(v) for k, v in self.cutoffs.items()}

    def audit_details(self) -> dict[str, object]:
        """The audit entry's details: retention, cutoffs and counts (never a row's content)."""
        return {"retention": self.retention, "cutoffs": self.cutoffs_utc(),
                "deleted": {t: self.counts.get(t, 0) for t in TABLES},
                "requests_kept_for_feedback": self.counts.get("requests_kept_for_feedback", 0)}

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "dry_run": self.dry_run, "at": self.at, "at_utc": _iso(self.at),
                **self.audit_details()}


def retention_target(ref: str, ws: Workspace) -> RetentionTarget:
    """``ref`` is a spec file (its ``name`` is the model) or a registered model's name (the spec
    shipped with its production version)."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        loaded = load_spec(path)
        return RetentionTarget(loaded.spec.name, loaded.spec.monitor.retention, str(loaded.path), loaded.sha256)
    try:
        version = registry.resolve(ws.tracking_uri, f"{ref}@production")
    except registry.RegistryError as exc:
        raise MonitorError(Problem(f"{ref!r} has no production version whose spec says how long to keep its rows",
                                   hint=f"pass the spec file instead: `tuneline monitor prune path/to/tuneline.yaml` "
                                        f"(its name must be {ref!r})")) from exc
    spec = shipped_spec(version)
    return RetentionTarget(ref, spec.monitor.retention, f"{ref}@{version.version}:tuneline.yaml")


def cutoffs_of(retention: RetentionSpec, now: float) -> dict[str, float | None]:
    """Per table group, the time before which rows go (None: kept for ever)."""
    out: dict[str, float | None] = {}
    for group, name in _CUTOFF_OF.items():
        days = getattr(retention, name)
        out[group] = None if days is None else now - days * DAY_SECONDS
    return out


def prune(target: RetentionTarget, store: RequestLog, *, now: float | None = None, dry_run: bool = False,
          batch_size: int = PRUNE_BATCH, result: PruneResult | None = None) -> PruneResult:
    """Delete the target's rows older than its retention (``dry_run``: count them). ``result``,
    when given, is filled as rows go, so a caller that catches an error still knows what was
    deleted before it."""
    at = time.time() if now is None else now
    if result is None:
        result = new_result(target, at, dry_run)
    store.prune(target.name, result.cutoffs, dry_run=dry_run, batch_size=batch_size, counts=result.counts)
    return result


def new_result(target: RetentionTarget, at: float, dry_run: bool) -> PruneResult:
    """An empty result of a prune of ``target`` at ``at``: its retention and cutoffs, no counts yet."""
    return PruneResult(target.name, target.retention.applied(), cutoffs_of(target.retention, at), at, dry_run)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
