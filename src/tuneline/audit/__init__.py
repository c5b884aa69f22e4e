"""Governance: the hash-chained audit trail (:mod:`tuneline.audit.trail`).

Every command and API action that changes state appends an entry (see docs/governance.md for the
list); ``tuneline audit verify`` checks the chain, ``audit log`` and ``audit export`` show it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tuneline.audit.trail import (
    ACTOR_ENV,
    AUDIT_URL_ENV,
    RESULT_FAILED,
    RESULT_INTERRUPTED,
    RESULT_OK,
    RESULT_REFUSED,
    AuditError,
    AuditTrail,
    Entry,
    Pending,
    Verification,
    key_actor,
    os_actor,
)
from tuneline.workspace import Workspace

__all__ = [
    "ACTOR_ENV",
    "AUDIT_URL_ENV",
    "RESULT_FAILED",
    "RESULT_INTERRUPTED",
    "RESULT_OK",
    "RESULT_REFUSED",
    "AuditError",
    "AuditTrail",
    "Entry",
    "Pending",
    "Verification",
    "audited",
    "key_actor",
    "os_actor",
    "record",
    "trail_of",
]


def trail_of(workspace: Workspace) -> AuditTrail:
    """The audit trail of a workspace: ``$TUNELINE_AUDIT_URL`` when set, else ``audit.db`` in it."""
    return AuditTrail.at(workspace.audit_url)


@contextmanager
def audited(workspace: Workspace, action: str, *, subject: str = "", inputs: dict[str, str] | None = None,
            actor: str | None = None) -> Iterator[Pending]:
    """Record an action of the workspace's trail when the block ends (see :meth:`AuditTrail.action`)."""
    trail = trail_of(workspace)
    try:
        with trail.action(action, subject=subject, inputs=inputs, actor=actor) as pending:
            yield pending
    finally:
        trail.close()


def record(workspace: Workspace, action: str, **entry: Any) -> Entry:
    """Append one entry to the workspace's trail (keywords as :meth:`AuditTrail.append`)."""
    trail = trail_of(workspace)
    try:
        return trail.append(action, **entry)
    finally:
        trail.close()
