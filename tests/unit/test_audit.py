"""The audit trail: hash chain, tamper detection naming the first broken link, concurrent appends,
and the `tuneline audit` commands."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from pathlib import Path

import pytest
from helpers import invoke_cli
from typer.testing import CliRunner

from tuneline.audit import AuditError, AuditTrail, os_actor
from tuneline.audit.trail import GENESIS, entry_hash
from tuneline.cli import app


def _trail(tmp_path: Path, n: int = 6) -> tuple[AuditTrail, Path]:
    db = tmp_path / "audit.db"
    trail = AuditTrail(f"sqlite:///{db}")
    for i in range(n):
        trail.append("run", subject=f"spec:s{i}", inputs={"spec": f"{i:064x}"}, outputs={"run": f"run-{i}"},
                     details={"rows": i})
    return trail, db


def _sql(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    with con:
        for s in statements:
            con.execute(s)
    con.close()


def test_an_untouched_chain_verifies_and_links_each_entry_to_the_one_before(tmp_path: Path) -> None:
    trail, _ = _trail(tmp_path)
    entries = trail.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in zip(entries, entries[1:], strict=False))
    result = trail.verify()
    assert result.ok and result.entries == 6 and result.head == entries[-1].hash
    assert entries[0].actor == os_actor()


def test_an_edited_entry_is_named(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path)
    _sql(db, "UPDATE audit_entries SET details = '{\"rows\":99}' WHERE seq = 3")
    result = trail.verify()
    assert not result.ok and result.seq == 3
    assert "entry 3 does not match its hash" in (result.broken or "")


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path)
    e = trail.entries()[2]
    forged = entry_hash(e.seq, e.at, "user:mallory", e.action, e.subject, e.inputs, e.outputs, e.result, e.details,
                        e.prev)
    _sql(db, f"UPDATE audit_entries SET actor = 'user:mallory', hash = '{forged}' WHERE seq = 3")
    result = trail.verify()
    assert not result.ok and result.seq == 4
    assert "between entries 3 and 4" in (result.broken or "")


def test_a_deleted_entry_is_named(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path)
    _sql(db, "DELETE FROM audit_entries WHERE seq = 4")
    result = trail.verify()
    assert not result.ok and result.seq == 5
    assert "entries 4..4 are missing" in (result.broken or "")


def test_an_inserted_entry_is_named(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path)
    # make room after entry 2 (renumber the rest) and insert a well-formed entry that links to entry 2
    e2 = trail.entries()[1]
    at = e2.at
    forged = entry_hash(3, at, "user:mallory", "promote", "model:x/1", {}, {}, "ok", {}, e2.hash)
    _sql(db, "UPDATE audit_entries SET seq = seq + 100 WHERE seq >= 3",
         "UPDATE audit_entries SET seq = seq - 99 WHERE seq >= 100",
         "INSERT INTO audit_entries VALUES (3, '" + at + "', 'user:mallory', 'promote', 'model:x/1', '{}', '{}', 'ok', "
         "'{}', '" + e2.hash + "', '" + forged + "')")
    result = trail.verify()
    assert not result.ok and result.seq == 4
    assert "between entries 3 and 4" in (result.broken or "")


def test_reordered_entries_are_named(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path)
    _sql(db, "UPDATE audit_entries SET seq = 100 WHERE seq = 2", "UPDATE audit_entries SET seq = 2 WHERE seq = 3",
         "UPDATE audit_entries SET seq = 3 WHERE seq = 100")
    result = trail.verify()
    assert not result.ok and result.seq == 2
    assert "between entries 1 and 2" in (result.broken or "")


def test_entries_cut_off_the_end_are_named(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path)
    _sql(db, "DELETE FROM audit_entries WHERE seq >= 5")
    result = trail.verify()
    assert not result.ok and "entries 5..6 were cut off the end" in (result.broken or "")


def test_concurrent_writers_never_share_a_number_or_break_the_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    trails = [AuditTrail(url) for _ in range(4)]
    errors: list[BaseException] = []

    def write(t: AuditTrail, who: int) -> None:
        try:
            for i in range(15):
                t.append("serve.start", subject="server", details={"writer": who, "i": i})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t, k)) for k, t in enumerate(trails)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    entries = trails[0].entries()
    assert len(entries) == 60 and [e.seq for e in entries] == list(range(1, 61))
    assert trails[0].verify().ok


def test_action_records_the_result_and_the_error_type_but_not_its_message(tmp_path: Path) -> None:
    trail = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}")
    with trail.action("data.prepare", subject="spec:x", inputs={"spec": "a" * 64}) as p:
        p.outputs["dataset"] = "ds-1"
    with pytest.raises(ValueError), trail.action("data.prepare", subject="spec:x"):
        raise ValueError("row 3 holds Jane Doe's card number")
    ok, failed = trail.entries()
    assert (ok.result, ok.outputs) == ("ok", {"dataset": "ds-1"})
    assert failed.result == "failed" and failed.details == {"error": "ValueError"}
    assert "Jane" not in json.dumps(failed.to_dict())


def test_filters_by_action_ref_and_time(tmp_path: Path) -> None:
    trail, _ = _trail(tmp_path, 3)
    trail.append("data.forget", subject="requests", outputs={"erasure": "er-1"})
    assert [e.action for e in trail.entries(action="data")] == ["data.forget"]
    assert [e.seq for e in trail.entries(refs=["run-1"])] == [2]
    assert trail.entries(since="2000-01-01") == trail.entries()
    assert trail.entries(since="2999-01-01T00:00") == []


def _cli(args: list[str]) -> tuple[int, str]:
    result = invoke_cli(*args)
    return result.exit_code, result.output


def test_cli_verify_log_and_export(tmp_path: Path) -> None:
    trail, db = _trail(tmp_path, 3)
    url = f"sqlite:///{db}"
    code, out = _cli(["audit", "verify", "--url", url])
    assert code == 0 and "intact" in out and "3 entries" in out
    code, out = _cli(["audit", "log", "--url", url, "--json"])
    assert code == 0 and [e["seq"] for e in json.loads(out)] == [1, 2, 3]
    code, out = _cli(["audit", "export", "--url", url, "--format", "jsonl"])
    lines = [json.loads(x) for x in out.splitlines()]
    # an auditor re-checks the chain from the export alone
    prev = GENESIS
    for e in lines:
        assert e["prev"] == prev
        fields = {k: e[k] for k in ("seq", "at", "actor", "action", "subject", "inputs", "outputs", "result",
                                    "details")}
        assert entry_hash(prev=prev, **fields) == e["hash"]
        prev = e["hash"]
    code, out = _cli(["audit", "export", "--url", url, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["seq"] for r in rows] == ["1", "2", "3"] and json.loads(rows[0]["inputs"]) == {"spec": f"{0:064x}"}
    _sql(db, "DELETE FROM audit_entries WHERE seq = 2")
    code, out = _cli(["audit", "verify", "--url", url])
    assert code == 1 and "entries 2..2 are missing" in out


def test_a_bad_since_names_the_option(tmp_path: Path) -> None:
    _, db = _trail(tmp_path, 1)
    result = CliRunner().invoke(app, ["audit", "log", "--url", f"sqlite:///{db}", "--since", "last tuesday"])
    assert isinstance(result.exception, AuditError)
    assert "--since" in result.exception.render() and "YYYY-MM-DD" in result.exception.render()
