"""Two machines' first commands create the same tables in one PostgreSQL at the same moment: the
loser's "duplicate key" (PostgreSQL's catalogue) or "already exists" (SQLite) is not an error."""

from __future__ import annotations

import pytest

from tuneline.runtime.sql import create_racing

PG_RACE = ('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
           '"pg_type_typname_nsp_index" DETAIL: Key (typname, typnamespace)=(audit_entries, 2200) already exists.')


def test_a_table_made_by_another_process_meanwhile_is_taken_as_made() -> None:
    calls = []

    def create() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(PG_RACE)

    create_racing(create)
    assert len(calls) == 2  # tried again, and the second try found the tables


def test_any_other_error_is_raised_at_once() -> None:
    calls = []

    def create() -> None:
        calls.append(1)
        raise RuntimeError('permission denied for schema public')

    with pytest.raises(RuntimeError, match="permission denied"):
        create_racing(create)
    assert len(calls) == 1


def test_a_race_that_persists_is_raised_after_the_last_try() -> None:
    def create() -> None:
        raise RuntimeError("table audit_entries already exists")

    with pytest.raises(RuntimeError, match="already exists"):
        create_racing(create, tries=2)
