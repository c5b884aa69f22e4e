"""The request log: each message redacted before it is encoded, logging that never blocks or
raises, a spool that keeps every row while the database fails, and exactly-once storage."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tuneline.monitor.store import RequestLog, RequestRecord, feedback_table

CARD = "4111 1111 1111 1111"
PII = [  # (text, what must not be stored, placeholder)
    (CARD, "1111 1111", "<CARD>"),
    ("+44 20 7946 0958", "7946 0958", "<PHONE>"),
    ("GB82 WEST 1234 5698 7654 32", "5698 7654", "<IBAN>"),
    ("123-45-6789", "45-6789", "<NATIONAL_ID>"),
    ("192.168.1.20", "192.168.1.20", "<IP>"),
    ("jane.doe@example.com", "jane.doe", "<EMAIL>"),
]
FULLWIDTH_CARD = "\uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11"


def _row(i: int | str, prompt: Any = None, response: str | None = "ok", **changes: Any) -> RequestRecord:
    fields = {"id": f"chatcmpl-{i}", "endpoint": "chat", "model": "m", "model_name": "m", "model_version": 1,
              "key_name": "k", "prompt": [{"role": "user", "content": f"hi {i}"}] if prompt is None else prompt,
              "response": response, "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "stop",
              "latency_ms": 1.5, "status": 200}
    return RequestRecord(**{**fields, **changes})


@pytest.fixture
def rlog(tmp_path: Path):
    rl = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    yield rl
    rl.close()


def _stored(rl: RequestLog) -> dict[str, dict[str, Any]]:
    rows = rl.rows()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    return {r["id"]: r for r in rows}


def _wait(cond, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------------- redaction


@pytest.mark.parametrize("prefix", ["\n", "\t", "my card:\n", "\r\n\t"])
@pytest.mark.parametrize(("pii", "secret", "placeholder"), PII)
def test_each_message_is_redacted_before_it_is_encoded(rlog, prefix, pii, secret, placeholder):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": f"{prefix}{pii}"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": f"again:{prefix}{pii}\tthanks"}]
    rlog.log(_row(1, msgs, response=f"noted{prefix}{pii}"))
    row = _stored(rlog)["chatcmpl-1"]
    assert secret not in row["prompt"] and secret not in row["response"]
    stored = json.loads(row["prompt"])  # still valid JSON
    assert stored[1] == {"role": "user", "content": f"{prefix}{placeholder}"}
    assert stored[3]["content"] == f"again:{prefix}{placeholder}\tthanks"
    assert row["response"] == f"noted{prefix}{placeholder}"
    assert row["pii_redacted"] == 3


def test_a_completion_prompt_and_text_parts_are_redacted(rlog):
    rlog.log(_row("c", f"Q: my card\n{CARD}\nA:", endpoint="completions"))
    parts = [{"role": "user", "content": [{"type": "text", "text": f"card:\n{CARD}"},
                                          {"type": "text", "text": "\tmail jane.doe@example.com"}]}]
    rlog.log(_row("p", parts))
    rows = _stored(rlog)
    assert json.loads(rows["chatcmpl-c"]["prompt"]) == "Q: my card\n<CARD>\nA:"
    assert json.loads(rows["chatcmpl-p"]["prompt"])[0]["content"] == [
        {"type": "text", "text": "card:\n<CARD>"}, {"type": "text", "text": "\tmail <EMAIL>"}]


def test_fullwidth_digits_are_redacted(rlog):
    rlog.log(_row(1, [{"role": "user", "content": f"my card:\n{FULLWIDTH_CARD}"}], response=FULLWIDTH_CARD))
    row = _stored(rlog)["chatcmpl-1"]
    assert "\uff11" not in row["prompt"] and row["response"] == "<CARD>"
    assert json.loads(row["prompt"])[0]["content"] == "my card:\n<CARD>"


def test_feedback_corrections_and_comments_are_redacted(rlog):
    rlog.log(_row(1))
    assert rlog.exists("chatcmpl-1")
    rlog.add_feedback("chatcmpl-1", -1, f"card_arrival\n{CARD}", f"call me:\t+44 20 7946 0958 or {FULLWIDTH_CARD}")
    fb = rlog.rows(feedback_table)
    assert [(f["correction"], f["comment"]) for f in fb] == [("card_arrival\n<CARD>", "call me:\t<PHONE> or <CARD>")]


def test_odd_values_are_stored_not_raised(rlog):
    class Obj:
        def __str__(self) -> str:
            return f"obj with {CARD}"

    rlog.log(_row(1, [{"role": "user", "content": "nul\x00 and lone \ud800 surrogate", "extra": Obj()}],
                  model="m" * 1000, prompt_tokens="7", latency_ms=None))
    row = _stored(rlog)["chatcmpl-1"]
    msg = json.loads(row["prompt"])[0]
    assert msg["extra"] == "obj with <CARD>" and "\x00" not in row["prompt"]
    assert msg["content"] == "nul\x00 and lone ? surrogate"  # NUL escaped by JSON, the surrogate replaced
    assert len(row["model"]) == 200 and row["prompt_tokens"] == 7


def test_logging_a_large_prompt_does_not_block_the_caller(rlog, monkeypatch):
    # log() only copies onto a queue: redaction (~0.1-0.2 s for this 200 KB prompt) and the write
    # are the writer thread's, never the caller's (the event loop's, in the server)
    callers: list[str] = []
    real = rlog.redactor.redact

    def spy(text):
        callers.append(threading.current_thread().name)
        return real(text)

    monkeypatch.setattr(rlog.redactor, "redact", spy)
    prompt = [{"role": "user", "content": "a@" * 100_000}]
    for i in range(10):
        rlog.log(_row(i, prompt))
    assert rlog.flush(timeout=120)
    assert callers and threading.current_thread().name not in callers
    assert len(_stored(rlog)) == 10


# ------------------------------------------------------------------------- never raises, never loses


def test_an_unreachable_database_never_raises_and_loses_nothing(tmp_path: Path):
    folder = tmp_path / "not-yet"  # the database's folder does not exist: SQLite cannot open it
    rl = RequestLog(f"sqlite:///{folder / 'requests.db'}", spool_dir=tmp_path / "spool", retry_seconds=0.05)
    try:
        for i in range(5):
            rl.log(_row(i, [{"role": "user", "content": f"card\n{CARD}"}]))
        assert rl.flush(timeout=30)
        st = rl.stats()
        assert st["spooled"] == 5 and st["failed"] == 5 and st["written"] == 0
        assert all(rl.exists(f"chatcmpl-{i}") for i in range(5))  # feedback can find them
        spooled = rl.spool_path.read_text()
        assert spooled.count("\n") == 5 and "1111 1111" not in spooled and "<CARD>" in spooled
        folder.mkdir()  # the database works again: the spooled rows move into it
        _wait(lambda: rl.stats()["in_spool"] == 0)
        rl.log(_row(5))
        rows = _stored(rl)
        assert sorted(rows) == [f"chatcmpl-{i}" for i in range(6)]
        assert rl.stats()["written"] == 6 and rl.stats()["recovered"] == 5
        assert rl.spool_path.read_text() == ""
    finally:
        rl.close()


def test_without_database_or_spool_rows_are_held_and_flush_says_so(tmp_path: Path):
    folder = tmp_path / "gone"  # the spool goes next to the database, so it fails too
    rl = RequestLog(f"sqlite:///{folder / 'requests.db'}", retry_seconds=0.05)
    try:
        rl.log(_row(1))
        assert rl.flush(timeout=30) is False
        assert rl.stats()["held"] == 1 and rl.exists("chatcmpl-1")
        folder.mkdir()
        _wait(lambda: rl.stats()["held"] == 0)
        assert rl.flush(timeout=30)
        assert list(_stored(rl)) == ["chatcmpl-1"]
    finally:
        rl.close()


def test_a_dropped_table_spools_then_recovers_at_close(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'requests.db'}"
    rl = RequestLog(url, retry_seconds=3600)  # no retry before close
    rl.log(_row("before"))
    assert rl.flush(timeout=30)
    with create_engine(url).begin() as conn:
        conn.execute(text("DROP TABLE requests"))
    for i in range(3):
        rl.log(_row(i))
    assert rl.flush(timeout=30)
    assert rl.stats()["in_spool"] == 3 and rl.exists("chatcmpl-2")
    rl.close()  # tries the database once more: creates the table again and moves the rows
    again = RequestLog(url)
    try:
        assert sorted(_stored(again)) == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
        assert again.stats()["in_spool"] == 0
    finally:
        again.close()


def test_a_locked_database_does_not_block_logging(tmp_path: Path):
    db = tmp_path / "requests.db"
    rl = RequestLog(f"sqlite:///{db}", retry_seconds=0.05, db_timeout=0.1)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        t0 = time.perf_counter()
        for i in range(10):
            rl.log(_row(i))
        assert time.perf_counter() - t0 < 0.5
        assert rl.flush(timeout=30)
        assert rl.stats()["written"] == 0 and rl.stats()["in_spool"] == 10
        locker.execute("COMMIT")
        _wait(lambda: rl.stats()["in_spool"] == 0)
        assert sorted(_stored(rl)) == sorted(f"chatcmpl-{i}" for i in range(10))
    finally:
        locker.close()
        rl.close()


def test_a_spool_left_by_an_earlier_process_is_recovered_without_duplicates(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'requests.db'}"
    first = RequestLog(url)
    first.log(_row(0))
    first.log(_row(1))
    first.close()
    # rows 1 and 2 spooled by a process that died: row 1 had reached the database already
    # (its commit succeeded but was reported as failed); the last line was torn by the crash
    base = {"created": 1.0, "endpoint": "chat", "model": "m", "model_name": "m", "model_version": 1,
            "key_name": None, "prompt": "[]", "response": None, "prompt_tokens": 1, "completion_tokens": 1,
            "finish_reason": "stop", "latency_ms": 1.0, "status": 200, "pii_redacted": 0}
    spool = tmp_path / "requests.db.spool.jsonl"
    spool.write_text("".join(json.dumps({**base, "id": f"chatcmpl-{i}"}) + "\n" for i in (1, 2)) + '{"id": "chatc')
    again = RequestLog(url)
    try:
        assert again.exists("chatcmpl-2")
        assert sorted(_stored(again)) == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
        _wait(lambda: again.stats()["in_spool"] == 0)
        assert spool.read_text() == ""
        assert (tmp_path / "requests.db.spool.jsonl.bad").read_text() == '{"id": "chatc\n'
    finally:
        again.close()


def test_60_concurrent_requests_are_each_stored_once_redacted_even_across_a_failure(tmp_path: Path):
    db = tmp_path / "requests.db"
    rl = RequestLog(f"sqlite:///{db}", retry_seconds=0.05, db_timeout=0.05, batch_size=8)
    locker = sqlite3.connect(db, isolation_level=None)
    start = threading.Barrier(60)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            start.wait()
            time.sleep(0.04 * (i % 8))  # some before, some during, some after the failure
            rl.log(_row(i, [{"role": "user", "content": f"my card:\n{CARD}"}], response=f"ok\t{CARD}"))
        except BaseException as exc:  # log() must not raise
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        time.sleep(0.06)
        locker.execute("BEGIN EXCLUSIVE")  # the database fails in the middle of the burst
        time.sleep(0.12)
        locker.execute("COMMIT")
        for t in threads:
            t.join()
        assert not errors
        assert rl.flush(timeout=60)
        _wait(lambda: rl.stats()["in_spool"] == 0 and rl.stats()["queued"] == 0)
        rows = _stored(rl)  # asserts no id twice
        assert sorted(rows) == sorted(f"chatcmpl-{i}" for i in range(60))
        assert not any("1111" in r["prompt"] or "1111" in r["response"] for r in rows.values())
        assert rl.stats()["written"] == 60
    finally:
        locker.close()
        rl.close()


def test_the_same_id_twice_is_stored_once_and_logging_works_after_close(rlog):
    rlog.log(_row(1))
    rlog.log(_row(1, response="second"))
    rlog.close()
    rlog.log(_row(2))  # starts the writer again
    rows = _stored(rlog)
    assert sorted(rows) == ["chatcmpl-1", "chatcmpl-2"] and rows["chatcmpl-1"]["response"] == "ok"


def test_an_in_memory_database_is_shared_with_the_writer():
    rl = RequestLog("sqlite://", spool_dir=None)
    try:
        rl.log(_row(1))
        assert list(_stored(rl)) == ["chatcmpl-1"] and rl.exists("chatcmpl-1") and not rl.exists("nope")
    finally:
        rl.close()
