"""Retention of the request log (`monitor.retention`, `tuneline monitor prune`): rows older than
the retention go and younger ones stay, a request whose feedback is still kept stays with it, old
checks and alerts go (the latest check stays, no alert that a later window could overlap), rows
go in batches and a failure midway says what it had deleted, a dry run deletes nothing, every
prune is audited with counts and no content, a spec without retention prunes nothing, and bad
retention values are refused naming their field."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import invoke_cli, spec_error
from sqlalchemy import func, insert, select
from typer.testing import Result

from tuneline.audit import AUDIT_URL_ENV, trail_of
from tuneline.monitor.results import CheckResult, Window
from tuneline.monitor.retention import RetentionTarget, cutoffs_of, prune
from tuneline.monitor.store import (
    RequestLog,
    RequestLogError,
    alerts_table,
    checks_table,
    feedback_table,
    requests_table,
)
from tuneline.spec.monitor import DAY_SECONDS, RetentionSpec
from tuneline.workspace import Workspace

NOW = 1_750_000_000.0
DAY = DAY_SECONDS
SECRET = "my card 4242 was stolen by Ada"  # a prompt's text: never in an audit entry


def _cli(*args: str) -> Result:
    return invoke_cli(*args)


def _request(rl: RequestLog, rid: str, age_days: float, model: str | None = "m") -> None:
    with rl.engine.begin() as conn:
        conn.execute(insert(requests_table).values(
            id=rid, created=NOW - age_days * DAY, endpoint="chat", model=model, model_name=model, model_version=1,
            prompt=json.dumps([{"role": "user", "content": f"{SECRET} ({rid})"}]), response="card_arrival",
            status=200, pii_redacted=0))


def _feedback(rl: RequestLog, rid: str, age_days: float) -> None:
    with rl.engine.begin() as conn:
        conn.execute(insert(feedback_table).values(response_id=rid, created=NOW - age_days * DAY, rating=-1,
                                                   correction=f"{SECRET}: lost_or_stolen_card"))


def _check(rl: RequestLog, age_days: float, model: str = "m") -> None:
    at = NOW - age_days * DAY
    rl.save_check(CheckResult(model, 1, "ds", at, Window(at - DAY, at, 60), []))


def _alert(rl: RequestLog, age_days: float, window_end_age: float, detector: str) -> None:
    with rl.engine.begin() as conn:
        conn.execute(insert(alerts_table).values(
            model="m", detector=detector, window_start=NOW - (window_end_age + 1) * DAY,
            window_end=NOW - window_end_age * DAY, at=NOW - age_days * DAY, payload="{}"))


def _ids(rl: RequestLog, table=requests_table) -> set:
    with rl.engine.connect() as conn:
        return set(conn.execute(select(table.c.id)).scalars())


def _count(rl: RequestLog, table) -> int:
    with rl.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _target(**days: float | None) -> RetentionTarget:
    return RetentionTarget("m", RetentionSpec(**days), "test")


@pytest.fixture
def store(tmp_path: Path):
    rl = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    yield rl
    rl.close()


# ------------------------------------------------------------------------- the store


def test_requests_older_than_the_retention_go_and_younger_ones_and_other_models_stay(store) -> None:
    for rid, age in (("old-1", 40), ("old-2", 31), ("young", 29), ("new", 0.1)):
        _request(store, rid, age)
    _request(store, "other-model", 400, model="other")  # another model's rows follow its own spec
    _request(store, "shed-before-body", 40, model=None)  # names no model: no prompt to keep it for

    got = prune(_target(requests_days=30), store, now=NOW)

    assert _ids(store) == {"young", "new", "other-model"}
    assert got.counts["requests"] == 3 and got.deleted == 3
    assert got.cutoffs == {"requests": NOW - 30 * DAY, "feedback": None, "checks": None}


def test_a_request_stays_while_its_feedback_is_kept_and_goes_with_it(store) -> None:
    _request(store, "rated-lately", 60)
    _feedback(store, "rated-lately", 10)  # feedback kept 90 days: its prompt stays for the harvest
    _request(store, "rated-long-ago", 200)
    _feedback(store, "rated-long-ago", 100)  # past the feedback retention: both go
    _request(store, "unrated", 60)

    got = prune(_target(requests_days=30, feedback_days=90), store, now=NOW)

    assert _ids(store) == {"rated-lately"}
    assert [f["response_id"] for f in store.feedback()] == ["rated-lately"]
    assert got.counts == {"feedback": 1, "requests": 2, "requests_kept_for_feedback": 1, "checks": 0, "alerts": 0}


def test_feedback_kept_for_ever_keeps_its_request_and_feedback_may_go_first(store) -> None:
    _request(store, "rated", 60)
    _feedback(store, "rated", 59)
    prune(_target(requests_days=30), store, now=NOW)  # feedback_days unset: kept for ever
    assert _ids(store) == {"rated"} and len(store.feedback()) == 1

    got = prune(_target(requests_days=90, feedback_days=30), store, now=NOW)  # feedback shorter: no orphan
    assert got.counts["feedback"] == 1 and got.counts["requests"] == 0
    assert _ids(store) == {"rated"} and store.feedback() == []


def test_old_checks_go_but_the_latest_stays_and_no_alert_a_later_window_could_overlap(store) -> None:
    for age in (200, 150, 120):
        _check(store, age)
    _check(store, 150, model="other")
    _request(store, "kept", 100)  # the oldest request left: windows from now on start no earlier
    _alert(store, 130, window_end_age=130, detector="ended-before-the-log")
    _alert(store, 95, window_end_age=95, detector="overlaps-what-stays")
    _alert(store, 10, window_end_age=10, detector="recent")

    got = prune(_target(checks_days=90), store, now=NOW)

    assert got.counts["checks"] == 2 and got.counts["alerts"] == 1
    assert [c.at for c in store.checks("m")] == [NOW - 120 * DAY]  # the latest, though old
    assert len(store.checks("other")) == 1
    assert {a["detector"] for a in store.alerts_sent("m")} == {"overlaps-what-stays", "recent"}
    assert _ids(store) == {"kept"}  # requests_days unset


def test_rows_go_in_batches_and_an_error_midway_says_what_was_deleted(store, monkeypatch) -> None:
    for i in range(7):
        _request(store, f"old-{i}", 40)
    counts: dict[str, int] = {}
    batches = []
    real = store.engine.begin

    def begin():
        batches.append(1)
        if len(batches) > 2:
            raise RuntimeError("database is locked")
        return real()

    monkeypatch.setattr(store.engine, "begin", begin)
    with pytest.raises(RequestLogError, match="cannot prune the rows of 'm': database is locked"):
        store.prune("m", cutoffs_of(RetentionSpec(requests_days=30), NOW), batch_size=3, counts=counts)
    assert counts["requests"] == 6 and len(_ids(store)) == 1  # two batches of 3 went before the error

    monkeypatch.setattr(store.engine, "begin", real)
    again = store.prune("m", cutoffs_of(RetentionSpec(requests_days=30), NOW), batch_size=3)
    assert again["requests"] == 1 and _ids(store) == set()  # a second run finishes the job


def test_a_dry_run_counts_what_a_prune_deletes_and_deletes_nothing(store) -> None:
    for rid, age in (("a", 40), ("b", 50), ("c", 5)):
        _request(store, rid, age)
    _feedback(store, "b", 45)
    _feedback(store, "c", 1)
    for age in (100, 95, 2):
        _check(store, age)
    _alert(store, 100, window_end_age=100, detector="old")
    target = _target(requests_days=30, feedback_days=30, checks_days=30)

    dry = prune(target, store, now=NOW, dry_run=True)
    assert _ids(store) == {"a", "b", "c"} and _count(store, feedback_table) == 2
    assert _count(store, checks_table) == 3 and _count(store, alerts_table) == 1

    real = prune(target, store, now=NOW)
    assert dry.counts == real.counts == {"feedback": 1, "requests": 2, "requests_kept_for_feedback": 0,
                                         "checks": 2, "alerts": 1}
    assert _ids(store) == {"c"}


# ------------------------------------------------------------------------- the spec


def test_retention_is_off_by_default_and_bad_values_name_their_field(tmp_path: Path) -> None:
    assert not RetentionSpec().enabled  # nothing is deleted unless the spec says so
    assert "monitor.retention.requests_days: Input should be greater than 0" in spec_error(
        tmp_path, "monitor: {retention: {requests_days: 0}}")
    assert "monitor.retention.feedback_days: Input should be greater than 0" in spec_error(
        tmp_path, "monitor: {retention: {feedback_days: -1}}")
    assert "monitor.retention.checks_days: Input should be a finite number" in spec_error(
        tmp_path, "monitor: {retention: {checks_days: .inf}}")
    assert "did you mean 'requests_days'" in spec_error(tmp_path, "monitor: {retention: {request_days: 30}}")
    msg = spec_error(tmp_path, "monitor: {window: {hours: 72}, retention: {requests_days: 30, feedback_days: 2}}")
    assert "monitor.retention.feedback_days (2 days) keeps less than monitor.window.hours (72 hours)" in msg


# ------------------------------------------------------------------------- the command


def _spec(folder: Path, retention: str | None) -> Path:
    body = "name: m\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
    body += "data: {train: {path: train.csv}}\n"
    if retention is not None:
        body += f"monitor: {{retention: {retention}}}\n"
    path = folder / "tuneline.yaml"
    path.write_text(body)
    return path


@pytest.fixture
def logged(tmp_path: Path, monkeypatch) -> Workspace:
    """A workspace whose request log holds old and recent traffic of ``m`` with feedback."""
    monkeypatch.delenv(AUDIT_URL_ENV, raising=False)
    ws = Workspace.at(tmp_path / "ws")
    rl = RequestLog(ws.requests_url)
    now = time.time()
    with rl.engine.begin() as conn:
        for i, age in enumerate((40, 35, 31, 3, 1)):
            conn.execute(insert(requests_table).values(
                id=f"r{i}", created=now - age * DAY, model="m", model_name="m", status=200,
                prompt=json.dumps([{"role": "user", "content": SECRET}]), response="x", pii_redacted=0))
        conn.execute(insert(feedback_table).values(response_id="r0", created=now - 39 * DAY, rating=1,
                                                   correction=SECRET))
        conn.execute(insert(feedback_table).values(response_id="r1", created=now - 2 * DAY, rating=-1))
    rl.close()
    return ws


def _prune_entries(ws: Workspace) -> list:
    trail = trail_of(ws)
    try:
        return trail.entries(action="monitor.prune")
    finally:
        trail.close()


def test_prune_prints_counts_and_audits_them_without_content(logged: Workspace, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "{requests_days: 30, feedback_days: 30}")

    dry = _cli("monitor", "prune", str(spec), "-w", str(logged.root), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would delete 3 rows" in dry.output and "nothing deleted" in dry.output
    assert len(RequestLog(logged.requests_url).requests("m")) == 5 and _prune_entries(logged) == []

    res = _cli("monitor", "prune", str(spec), "-w", str(logged.root))
    assert res.exit_code == 0, res.output
    assert "deleted 3 rows" in res.output and "1 older requests kept: feedback on them is still kept" in res.output
    left = RequestLog(logged.requests_url)
    assert [r["id"] for r in left.requests("m")] == ["r1", "r3", "r4"]
    assert [f["response_id"] for f in left.feedback()] == ["r1"]

    [entry] = _prune_entries(logged)
    assert entry.subject == "model:m" and entry.result == "ok" and len(entry.inputs["spec"]) == 64
    assert entry.details["deleted"] == {"requests": 2, "feedback": 1, "checks": 0, "alerts": 0}
    assert entry.details["retention"] == {"requests_days": 30, "feedback_days": 30, "checks_days": None}
    assert entry.details["cutoffs"]["requests"].endswith("Z") and entry.details["cutoffs"]["checks"] is None
    assert SECRET not in json.dumps(entry.to_dict())  # counts, never content

    again = _cli("monitor", "prune", str(spec), "-w", str(logged.root), "--json")
    assert again.exit_code == 0, again.output
    got = json.loads(again.stdout)
    assert got["model"] == "m" and got["dry_run"] is False and got["deleted"]["requests"] == 0
    assert len(_prune_entries(logged)) == 2  # a prune that deleted nothing is recorded too: retention was enforced


def test_a_spec_without_retention_has_nothing_to_prune(logged: Workspace, tmp_path: Path) -> None:
    res = _cli("monitor", "prune", str(_spec(tmp_path, None)), "-w", str(logged.root))
    assert res.exit_code == 0, res.output
    assert "sets no monitor.retention: nothing to prune" in res.output
    assert len(RequestLog(logged.requests_url).requests("m")) == 5 and _prune_entries(logged) == []


@pytest.mark.slow  # the first registry lookup makes the workspace's MLflow database (~18 s)
def test_a_model_without_production_version_points_to_the_spec_file(logged: Workspace) -> None:
    res = _cli("monitor", "prune", "m", "-w", str(logged.root))
    assert res.exit_code == 1
    assert "has no production version" in str(res.exception or res.output)
