"""Governance: the hash-chained audit trail (:mod:`tuneline.audit.trail`).

Every command and API action that changes state appends an entry (see docs/governance.md for the
list); ``tuneline audit verify`` checks the chain, ``audit log`` and ``audit export`` show it.
"""

from __future__ import annotations

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
    "key_actor",
    "os_actor",
    "trail_of",
]


def trail_of(workspace: Workspace) -> AuditTrail:
    """The audit trail of a workspace: ``$TUNELINE_AUDIT_URL`` when set, else ``audit.db`` in it."""
    return AuditTrail.at(workspace.audit_url)
