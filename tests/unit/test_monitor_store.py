"""The monitor store beyond the request log's writer: the predicted-label column and the migration
of databases made before it, rows of refused requests, the read API the monitor uses, stored
checks rebuilt as they were, and alert claims that give one alert per detector per window even
when two processes claim at once."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tuneline.monitor.results import CheckResult, DetectorResult, Window
from tuneline.monitor.store import RequestLog, RequestRecord, requests_table

# the requests table as tuneline made it before predicted_label existed
OLD_REQUESTS = """CREATE TABLE requests (id VARCHAR(64) NOT NULL, created FLOAT NOT NULL, endpoint VARCHAR(64),
    model VARCHAR(200), model_name VARCHAR(200), model_version INTEGER, key_name VARCHAR(200), prompt TEXT,
    response TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason VARCHAR(32), latency_ms FLOAT,
    status INTEGER, pii_redacted INTEGER, PRIMARY KEY (id))"""


def _record(i: int | str, model: str = "m", **changes: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "id": f"chatcmpl-{i}", "endpoint": "chat", "model": model, "model_name": model, "model_version": 1,
        "key_name": "k", "prompt": [{"role": "user", "content": f"hi {i}"}], "response": "card_arrival",
        "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "stop", "latency_ms": 1.5, "status": 200}
    return RequestRecord(**{**fields, **changes})


@pytest.fixture
def store(tmp_path: Path):
    rl = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    yield rl
    rl.close()


def _rows_at(rl: RequestLog, stamps: dict[str, float]) -> None:
    """Give the stored rows the creation times ``stamps`` (id -> time), for time filters."""
    rl.flush()
    with rl.engine.begin() as conn:
        for rid, t in stamps.items():
            conn.exec_driver_sql("UPDATE requests SET created = ? WHERE id = ?", (t, rid))


# ------------------------------------------------------------------------- columns and migration


def test_the_predicted_label_and_a_refused_request_are_stored(store):
    store.log(_record(1, predicted_label="card_arrival"))
    store.log(_record("shed", prompt=None, response=None, prompt_tokens=None, completion_tokens=None,
                      finish_reason=None, status=429))
    rows = {r["id"]: r for r in store.requests()}
    assert rows["chatcmpl-1"]["predicted_label"] == "card_arrival"
    shed = rows["chatcmpl-shed"]
    assert shed["status"] == 429 and shed["prompt"] is None and shed["response"] is None
    assert shed["predicted_label"] is None and shed["pii_redacted"] == 0


def test_a_database_made_before_predicted_label_gets_the_column_and_keeps_its_rows(tmp_path: Path):
    db = tmp_path / "requests.db"
    with sqlite3.connect(db) as conn:
        conn.execute(OLD_REQUESTS)
        conn.execute("INSERT INTO requests VALUES ('old-1', 1.0, 'chat', 'm', 'm', 1, NULL, '[]', 'x', 1, 1, "
                     "'stop', 2.0, 200, 0)")
    # a row spooled by the older tuneline (no predicted_label) is recovered too
    spooled = {"id": "old-2", "created": 2.0, "endpoint": "chat", "model": "m", "model_name": "m",
               "model_version": 1, "key_name": None, "prompt": "[]", "response": "y", "prompt_tokens": 1,
               "completion_tokens": 1, "finish_reason": "stop", "latency_ms": 1.0, "status": 200, "pii_redacted": 0}
    (tmp_path / "requests.db.spool.jsonl").write_text(json.dumps(spooled) + "\n")
    rl = RequestLog(f"sqlite:///{db}")
    try:
        rl.log(_record("new", predicted_label="exchange_rate"))
        rows = {r["id"]: r for r in rl.requests()}
        assert set(rows) == {"old-1", "old-2", "chatcmpl-new"}
        assert rows["old-1"]["predicted_label"] is None and rows["old-1"]["response"] == "x"
        assert rows["old-2"]["predicted_label"] is None
        assert rows["chatcmpl-new"]["predicted_label"] == "exchange_rate"
    finally:
        rl.close()
    with sqlite3.connect(db) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    assert columns[-1] == "predicted_label" and columns.count("predicted_label") == 1


def test_two_stores_opening_an_old_database_at_once_both_work(tmp_path: Path):
    db = tmp_path / "requests.db"
    with sqlite3.connect(db) as conn:
        conn.execute(OLD_REQUESTS)
    opened: list[RequestLog] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def open_it() -> None:
        try:
            start.wait()
            opened.append(RequestLog(f"sqlite:///{db}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and len(opened) == 2
        for i, rl in enumerate(opened):
            rl.log(_record(i, predicted_label=f"label-{i}"))
            assert rl.flush(timeout=30)
        assert [r["predicted_label"] for r in opened[0].requests()] == ["label-0", "label-1"]
        assert opened[0].stats()["in_spool"] == opened[1].stats()["in_spool"] == 0
    finally:
        for rl in opened:
            rl.close()


# ------------------------------------------------------------------------- reading


def test_requests_are_read_in_time_order_by_model_and_window(store):
    for i in range(6):
        store.log(_record(i, model="a" if i % 2 == 0 else "b", status=200 if i != 4 else 404))
    _rows_at(store, {f"chatcmpl-{i}": 100.0 + 10 * (5 - i) for i in range(6)})  # logged newest first
    assert [r["id"] for r in store.requests()] == [f"chatcmpl-{i}" for i in (5, 4, 3, 2, 1, 0)]
    assert [r["id"] for r in store.requests("a")] == ["chatcmpl-4", "chatcmpl-2", "chatcmpl-0"]
    assert [r["status"] for r in store.requests("a")] == [404, 200, 200]  # every status
    assert [r["id"] for r in store.requests(since=120.0, until=140.0)] == ["chatcmpl-3", "chatcmpl-2",
                                                                           "chatcmpl-1"]
    assert [r["id"] for r in store.requests(limit=2)] == ["chatcmpl-1", "chatcmpl-0"]  # the newest two
    assert [r["id"] for r in store.requests("b", limit=2, until=135.0)] == ["chatcmpl-5", "chatcmpl-3"]
    assert store.requests("nobody") == [] and store.requests(limit=0) == []
    row = store.requests("a")[0]
    assert json.loads(row["prompt"] or "") == [{"role": "user", "content": "hi 4"}]
    assert set(row) == {c.name for c in requests_table.columns}


def test_feedback_is_read_in_time_order_for_the_responses_asked(store):
    for i in range(3):
        store.log(_record(i))
    ids = [store.add_feedback(f"chatcmpl-{i % 3}", 1 - 2 * (i % 2), f"fix {i}", None) for i in range(5)]
    with store.engine.begin() as conn:  # given in reverse order of id
        for k, fid in enumerate(ids):
            conn.exec_driver_sql("UPDATE feedback SET created = ? WHERE id = ?", (1000.0 - k, fid))
    assert [f["correction"] for f in store.feedback()] == [f"fix {i}" for i in (4, 3, 2, 1, 0)]
    assert [f["correction"] for f in store.feedback(["chatcmpl-1"])] == ["fix 4", "fix 1"]
    assert [f["correction"] for f in store.feedback(since=998.0)] == ["fix 2", "fix 1", "fix 0"]
    assert store.feedback([]) == []
    many = [f"chatcmpl-x{i}" for i in range(1200)] + ["chatcmpl-0", "chatcmpl-2"]  # more than one IN query
    assert [f["correction"] for f in store.feedback(many)] == ["fix 3", "fix 2", "fix 0"]
    first = store.feedback()[0]
    assert first["rating"] == 1 and first["response_id"] == "chatcmpl-1" and first["comment"] is None


# ------------------------------------------------------------------------- checks


def _check(model: str, at: float, fired: bool = False) -> CheckResult:
    results = [
        DetectorResult("input.embedding", "input", "alert" if fired else "ok", 0.31, 0.2,
                       "MMD 0.31 (p 0.001)", p_value=0.001, n_reference=500, n_current=200,
                       extra={"auc": 0.74, "encoder": "minilm", "lower": None}),
        DetectorResult("quality.negative_feedback", "quality", "insufficient", None, 0.1, "3 ratings"),
        DetectorResult("operations.latency_p95_ms", "operations", "info", 812.5, None, "p95 812 ms"),
    ]
    return CheckResult(model, 3, "intents@2", at, Window(at - 3600, at, 200, "chatcmpl-a", "chatcmpl-z"), results)


def test_a_saved_check_is_read_back_as_it_was(store):
    first, second, other = _check("intents", 1000.0), _check("intents", 2000.0, fired=True), _check("other", 1500.0)
    ids = [store.save_check(c) for c in (second, other, first)]  # saved out of time order
    assert len(set(ids)) == 3
    assert store.checks("intents") == [first, second]
    assert store.checks("intents", since=1500.0) == [second]
    assert store.latest_check("intents") == second and store.latest_check("nobody") is None
    assert store.checked_models() == ["intents", "other"]
    assert [r.name for r in store.latest_check("intents").fired] == ["input.embedding"]
    with store.engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT model, version, at, window_start, window_end, window_requests, fired "
                                   "FROM checks WHERE id = ?", (ids[0],)).one()
    assert tuple(row) == ("intents", 3, 2000.0, 2000.0 - 3600, 2000.0, 200, 1)


# ------------------------------------------------------------------------- alerts


def test_one_alert_per_detector_per_window(store):
    assert store.claim_alert("intents", "input.embedding", 0.0, 100.0, '{"n": 1}')
    assert not store.claim_alert("intents", "input.embedding", 0.0, 100.0, '{"n": 2}')  # the same window
    assert not store.claim_alert("intents", "input.embedding", 50.0, 150.0, "{}")  # overlapping it
    assert not store.claim_alert("intents", "input.embedding", 100.0, 200.0, "{}")  # touching its end
    assert store.claim_alert("intents", "output.labels", 0.0, 100.0, "{}")  # another detector
    assert store.claim_alert("other", "input.embedding", 0.0, 100.0, "{}")  # another model
    assert store.claim_alert("intents", "input.embedding", 100.5, 200.0, '{"n": 3}')  # the next window
    sent = store.alerts_sent("intents")
    assert [(a["detector"], a["window_start"], a["payload"]) for a in sent] == [
        ("input.embedding", 0.0, '{"n": 1}'), ("output.labels", 0.0, "{}"), ("input.embedding", 100.5, '{"n": 3}')]
    assert store.alerts_sent("intents", since=sent[-1]["at"]) == sent[-1:]
    assert store.alerts_sent("nobody") == []


def test_a_released_alert_is_claimed_again_by_the_next_check(store):
    assert store.claim_alert("intents", "input.embedding", 0.0, 100.0, "{}")
    store.release_alert("intents", "input.embedding", 0.0)  # its delivery failed
    assert store.alerts_sent("intents") == []
    assert store.claim_alert("intents", "input.embedding", 10.0, 110.0, "{}")  # the next, overlapping window
    assert not store.claim_alert("intents", "input.embedding", 20.0, 120.0, "{}")


def test_two_processes_claiming_the_same_alert_at_once_send_it_once(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'requests.db'}"
    stores = [RequestLog(url), RequestLog(url)]  # each its own connections and locks, as two processes
    rounds, per_store = 12, 3
    wins: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barriers = [threading.Barrier(len(stores) * per_store) for _ in range(rounds)]

    def claimer(rl: RequestLog, who: int) -> None:
        try:
            for k in range(rounds):
                barriers[k].wait()
                # round k: a new (detector, window); the same lock row for every round of a detector
                if rl.claim_alert("intents", f"d{k % 3}", 100.0 * k, 100.0 * k + 50, f"{who}"):
                    wins.append((k, who))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(rl, 10 * s + t))
               for s, rl in enumerate(stores) for t in range(per_store)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        assert sorted(k for k, _ in wins) == list(range(rounds))  # each round: exactly one winner
        assert len(stores[1].alerts_sent("intents")) == rounds
        assert {w // 10 for _, w in wins} <= {0, 1}
    finally:
        for rl in stores:
            rl.close()


def test_a_check_stored_by_a_newer_tuneline_is_read_without_its_new_fields():
    from tuneline.monitor.store import check_from_json

    check = _check("intents", 1000.0, fired=True)
    data = check.to_dict()
    data["new_top_level"] = 1
    data["window"]["new_window_field"] = "x"
    data["results"][0]["new_detector_field"] = [1, 2]
    assert check_from_json(json.dumps(data)) == check
