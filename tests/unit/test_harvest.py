"""Feedback harvesting: corrections on logged answers become a curated dataset version whose rows
name the requests they came from, with preference pairs beside it; nothing is dropped uncounted,
and a harvest without new feedback changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import banking_rows, tiny_lora_spec
from sqlalchemy import text

from tuneline.curation import load_version
from tuneline.monitor.harvest import (
    HARVEST_FILE,
    PREFERENCES_FILE,
    harvest,
    prompt_messages,
    task_record,
)
from tuneline.monitor.store import RequestLog, RequestRecord
from tuneline.registry import FEEDBACK_LINKS
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

NAME = "intents"


def _record(rid: str, user: str, answer: str, model: str = NAME) -> RequestRecord:
    return RequestRecord(id=rid, endpoint="chat", model=model, model_name=model, model_version=1, key_name=None,
                         prompt=[{"role": "user", "content": user}], response=answer, prompt_tokens=10,
                         completion_tokens=2, finish_reason="stop", latency_ms=5.0, status=200)


@pytest.fixture
def setup(tmp_path: Path):
    """A classification spec accepting positive answers, and a request log with feedback of every kind."""
    spec = tiny_lora_spec(tmp_path, tmp_path, NAME, extra="monitor: {feedback: {accepted_as_positive: true}}")
    spec.write_text(spec.read_text().replace(  # declared labels: a correction outside them is refused
        "task: {type: classification,", "task: {type: classification, labels: [card_arrival, lost_or_stolen_card, "
        "exchange_rate],"))
    ws = Workspace.at(tmp_path / "ws")
    log = RequestLog(ws.requests_url)
    test_row = banking_rows(["exchange_rate"], 1, "test")[0]
    log.log(_record("r-dup", test_row["text"], "card_arrival"))  # the same input as a test row
    log.log(_record("r-unknown", "Can I pay my rent with the card?", "card_arrival"))
    log.log(_record("r-lost1", "Someone took my wallet with the card in it", "card_arrival"))
    log.log(_record("r-lost2", "Someone took my wallet with the card in it", "exchange_rate"))
    log.log(_record("r-good", "What rate do you use to convert pounds to yen?", "exchange_rate"))
    log.log(_record("r-bad", "How long until my new card shows up?", "exchange_rate"))
    log.log(_record("r-other", "Where is my card?", "card_arrival", model="other-model"))
    assert log.flush(10)
    with log.engine.begin() as conn:  # an older row the log did not redact: curation must
        conn.execute(text("INSERT INTO requests (id, created, endpoint, model, model_name, model_version, prompt, "
                          "response, status) VALUES ('r-pii', :t, 'chat', :m, :m, 1, :p, 'exchange_rate', 200)"),
                     {"t": time.time(), "m": NAME, "p": json.dumps([
                         {"role": "user", "content": "My card never arrived, write to jane.doe@example.com please"}])})
    log.add_feedback("r-pii", -1, "card_arrival", None)
    log.add_feedback("r-dup", None, "exchange_rate", None)
    log.add_feedback("r-unknown", -1, "pay_rent", "no such intent")
    log.add_feedback("r-lost1", None, "lost_or_stolen_card", None)
    log.add_feedback("r-lost2", -1, "lost_or_stolen_card", None)
    log.add_feedback("r-good", 1, None, None)
    log.add_feedback("r-bad", -1, None, None)
    log.add_feedback("r-other", None, "card_arrival", None)
    log.add_feedback("r-missing", None, "card_arrival", None)
    yield load_spec(spec), ws, log
    log.close(5)


def test_harvest_rows_pairs_links_and_counts(setup):
    loaded, ws, log = setup
    result = harvest(loaded, ws, log)
    assert result.created and result.rows == 3
    assert result.skipped == {"curation: eval_exact": 1, "no_such_request": 1, "rejected_without_correction": 1,
                              "unknown_label": 1}
    assert result.other_models == 1 and result.feedback == 9

    version = load_version(result.version, ws.datasets_dir)
    train = version.split("train")
    by_label = {ex.label: ex for ex in train}
    assert sorted(by_label) == ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
    pii_row = by_label["card_arrival"].messages[-2]["content"]
    assert "jane.doe@example.com" not in pii_row and "<EMAIL>" in pii_row  # redacted by curation
    assert version.manifest["pii_found"] == {"email": 1}
    assert version.manifest["dropped_by_reason"] == {"eval_exact": 1}
    assert version.split("test")  # the spec's test set, decontaminated against

    links = json.loads((version.path / FEEDBACK_LINKS).read_text())
    rows = {train[r["row"]].label: r for r in links["rows"]}
    assert rows["lost_or_stolen_card"]["request_ids"] == ["r-lost1", "r-lost2"]  # one row, both requests
    assert rows["card_arrival"]["request_ids"] == ["r-pii"]
    assert rows["exchange_rate"]["request_ids"] == ["r-good"] and rows["exchange_rate"]["kind"] == "positive"
    assert links["request_ids"] == ["r-good", "r-lost1", "r-lost2", "r-pii"] == result.request_ids

    pairs = [json.loads(x) for x in (version.path / PREFERENCES_FILE).read_text().splitlines()]
    got = {(p["chosen"], p["rejected"]): p["request_ids"] for p in pairs}
    # the decontaminated row's pair is left out with its row; r-lost1 and r-lost2 rejected different answers
    assert got == {("card_arrival", "exchange_rate"): ["r-pii"], ("lost_or_stolen_card", "card_arrival"): ["r-lost1"],
                   ("lost_or_stolen_card", "exchange_rate"): ["r-lost2"]}
    assert "<EMAIL>" in next(p for p in pairs if p["request_ids"] == ["r-pii"])["prompt"][0]["content"]

    info = json.loads((version.path / HARVEST_FILE).read_text())
    assert info["kind"] == "harvest" and info["model"] == NAME
    assert info["requests"]["count"] == 4 and {info["requests"]["first"], info["requests"]["last"]} <= {
        "r-pii", "r-lost1", "r-lost2", "r-good"}


def test_harvest_is_idempotent_and_takes_only_new_feedback(setup):
    loaded, ws, log = setup
    first = harvest(loaded, ws, log)
    again = harvest(loaded, ws, log)
    assert not again.created and again.version == first.version and again.rows == 0
    # all but the other model's and the one on an unknown request (whose row may still arrive)
    assert again.already_harvested == 7 and again.skipped == {"no_such_request": 1}
    everything = harvest(loaded, ws, log, everything=True)
    assert everything.version == first.version and everything.rows == 3  # the same rows: the same version

    log.log(_record("r-new", "The card you sent me has not come yet", "exchange_rate"))
    assert log.flush(10)
    log.add_feedback("r-new", None, "card_arrival", None)
    new = harvest(loaded, ws, log)
    assert new.created and new.version != first.version and new.request_ids == ["r-new"]
    assert new.already_harvested == 7 and new.rows == 1


def test_feedback_harvest_cli(setup):
    loaded, ws, _ = setup
    cli = [sys.executable, "-c", "from tuneline.cli import main; main()"]
    out = subprocess.run([*cli, "feedback", "harvest", NAME, "--spec", str(loaded.path), "-w", str(ws.root), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["rows"] == 3 and got["skipped"]["unknown_label"] == 1 and got["version"].startswith("ds-")
    out = subprocess.run([*cli, "feedback", "harvest", NAME, "--spec", str(loaded.path), "-w", str(ws.root)],
                         capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", **_env()})
    assert out.returncode == 0 and "no new feedback" in out.stdout, out.stdout + out.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_prompt_and_record_shapes():
    assert prompt_messages(json.dumps("plain completion prompt")) == [{"role": "user", "content": "plain completion prompt"}]
    msgs = prompt_messages(json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "old"}]))
    assert msgs == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert prompt_messages(json.dumps([{"role": "system", "content": "s"}])) is None
    assert task_record("instruction", msgs, "fixed") == {"instruction": "q", "response": "fixed"}
    assert task_record("summarization", msgs, "short") == {"text": "q", "summary": "short"}
    assert task_record("chat", msgs, "fixed")["messages"][-1] == {"role": "assistant", "content": "fixed"}


def test_without_declared_labels_a_correction_may_bring_a_new_intent(tmp_path: Path):
    spec = tiny_lora_spec(tmp_path, tmp_path, NAME)  # labels inferred from the training rows
    ws = Workspace.at(tmp_path / "ws")
    log = RequestLog(ws.requests_url)
    log.log(_record("r-rent", "Can I pay my rent with the card?", "card_arrival"))
    assert log.flush(10)
    log.add_feedback("r-rent", -1, "pay_rent", None)
    got = harvest(load_spec(spec), ws, log)
    log.close()
    assert got.rows == 1 and "unknown_label" not in got.skipped and got.request_ids == ["r-rent"]
