"""Helpers for the SQL stores (the request log, the audit trail) that several processes open at once."""

from __future__ import annotations

import time
from collections.abc import Callable


def create_racing(create: Callable[[], None], tries: int = 3) -> None:
    """Run ``create`` (a ``metadata.create_all``), tolerating another process that makes the same
    tables at the same moment: PostgreSQL then reports a duplicate key in its catalogue, SQLite
    "table ... already exists"; the next try finds the tables made and creates nothing."""
    for attempt in range(tries):
        try:
            create()
            return
        except Exception as exc:
            message = str(exc).lower()
            if attempt == tries - 1 or ("already exists" not in message and "duplicate" not in message):
                raise
            time.sleep(0.05 * (attempt + 1))
