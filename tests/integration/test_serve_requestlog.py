"""The request log through the server: a card number after a newline, in a chat message, a
completion prompt or a streamed answer, is never stored in clear, and feedback finds the answer
right after it was given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.serve import Key, build_app
from tuneline.workspace import Workspace

CARD = "4111 1111 1111 1111"
FULLWIDTH_CARD = "\uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11"
AUTH = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    ws = Workspace.at(tmp_path_factory.mktemp("serve-log") / "ws")
    app = build_app(ws, keys={"sk-test": Key("ops", {"*"})}, base=str(tiny_model_dir), resolve_ttl=0.0)
    yield app
    app.state.engine.close()
    app.state.request_log.close()


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def _row(app, rid: str) -> dict:
    rows = [r for r in app.state.request_log.rows() if r["id"] == rid]
    assert len(rows) == 1
    return rows[0]


def test_chat_completions_and_streams_log_no_card_in_clear(app, client, tiny_model_dir: Path):
    model = str(tiny_model_dir)
    chat = client.post("/v1/chat/completions", headers=AUTH, json={"model": model, "max_tokens": 2, "messages": [
        {"role": "user", "content": f"my card:\n{CARD}"},
        {"role": "assistant", "content": "noted"},
        {"role": "user", "content": f"and\t{FULLWIDTH_CARD}, mail\njane.doe@example.com"}]})
    assert chat.status_code == 200, chat.text
    rid = chat.json()["id"]
    # feedback right after the answer finds it, whether or not its row is written yet
    fb = client.post("/v1/feedback", headers=AUTH, json={"response_id": rid, "rating": -1,
                                                         "correction": f"card_arrival\n{CARD}"})
    assert fb.status_code == 200, fb.text

    comp = client.post("/v1/completions", headers=AUTH, json={"model": model, "max_tokens": 2,
                                                               "prompt": f"Q: card\n{CARD}\nA:"})
    assert comp.status_code == 200, comp.text

    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": model, "max_tokens": 2, "stream": True,
            "messages": [{"role": "user", "content": f"card\n{CARD}"}]}) as resp:
        assert resp.status_code == 200
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    stream_id = json.loads(events[0])["id"]

    chat_row, comp_row, stream_row = _row(app, rid), _row(app, comp.json()["id"]), _row(app, stream_id)
    for row in (chat_row, comp_row, stream_row):
        assert "1111" not in row["prompt"] and "\uff11" not in row["prompt"] and "jane.doe" not in row["prompt"]
    msgs = json.loads(chat_row["prompt"])  # valid JSON
    assert [m["content"] for m in msgs] == ["my card:\n<CARD>", "noted", "and\t<CARD>, mail\n<EMAIL>"]
    assert chat_row["pii_redacted"] >= 3
    assert json.loads(comp_row["prompt"]) == "Q: card\n<CARD>\nA:"
    assert json.loads(stream_row["prompt"])[0]["content"] == "card\n<CARD>"
    assert stream_row["response"] is not None and stream_row["status"] == 200
    from tuneline.monitor.store import feedback_table

    fbs = [f for f in app.state.request_log.rows(feedback_table) if f["response_id"] == rid]
    assert [f["correction"] for f in fbs] == ["card_arrival\n<CARD>"]
