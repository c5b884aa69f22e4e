"""The server end to end: registry versions served through the OpenAI client, promotion and
rollback picked up without a restart, keys and scopes, OpenAI-style 4xx errors, streaming,
feedback, a PII-redacted request log, and mixed-adapter batches equal to one-at-a-time answers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import uvicorn_on_loopback

import tuneline
from tuneline import registry
from tuneline.serve import Key, build_app
from tuneline.workspace import Workspace

KEYS = {"sk-all": Key("ops", {"*"}), "sk-other": Key("other-team", {"another-model"})}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from helpers import tiny_lora_spec

    tmp = tmp_path_factory.mktemp("serve")
    spec = tiny_lora_spec(tmp, tiny_model_dir, "tiny-intents")
    ws = Workspace.at(tmp / "ws")
    v1 = tuneline.run(spec, workspace=ws, show_progress=False).model_version
    spec.write_text(spec.read_text().replace("seed: 0", "seed: 1").replace("max_steps: 3", "max_steps: 6"))
    v2 = tuneline.run(spec, workspace=ws, show_progress=False).model_version
    assert (v1, v2) == (1, 2)
    registry.promote(ws.tracking_uri, "tiny-intents", 1)

    app = build_app(ws, keys=KEYS, resolve_ttl=0.0)
    with uvicorn_on_loopback(app) as url:
        yield {"url": url, "ws": ws, "app": app}
    app.state.engine.close()


def _client(served, key: str = "sk-all"):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def _ask(served, model: str = "tiny-intents", content: str = "my card has not arrived") -> str:
    resp = _client(served).chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                   max_tokens=4)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.completion_tokens <= 4
    return resp.model


def test_promotion_and_rollback_are_picked_up_without_a_restart(served):
    uri = served["ws"].tracking_uri
    assert _ask(served) == "tiny-intents@1"
    registry.promote(uri, "tiny-intents", 2)
    assert _ask(served) == "tiny-intents@2"  # the next call, same server process
    registry.rollback(uri, "tiny-intents")
    assert _ask(served) == "tiny-intents@1"
    assert _ask(served, "tiny-intents@candidate") == "tiny-intents@2"
    assert _ask(served, "tiny-intents@2") == "tiny-intents@2"
    ids = {m.id for m in _client(served).models.list().data}
    assert {"tiny-intents", "tiny-intents@1", "tiny-intents@2", "tiny-intents@candidate"} <= ids


def test_keys_and_scopes(served):
    import openai

    with pytest.raises(openai.AuthenticationError):
        _client(served, "sk-wrong").chat.completions.create(model="tiny-intents",
                                                            messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError):
        _client(served, "sk-other").chat.completions.create(model="tiny-intents",
                                                            messages=[{"role": "user", "content": "x"}])
    r = httpx.post(served["url"] + "/v1/chat/completions", json={"model": "tiny-intents", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    visible = [m.id for m in _client(served, "sk-other").models.list().data]
    assert visible == []  # only what its scope allows: not tiny-intents, nor the base model it may not call


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "json_invalid"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "tiny-intents@99", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "tiny-intents", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, None),
    ({"model": "tiny-intents", "messages": "hello"}, 400, None),
    ({"model": "tiny-intents", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ({"model": "tiny-intents", "messages": [{"role": "user", "content": "card " * 600}]}, 400,
     "context_length_exceeded"),
])
def test_client_mistakes_get_openai_style_4xx(served, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(served["url"] + "/v1/chat/completions", headers={"Authorization": "Bearer sk-all",
                                                                    "Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code


def test_streaming_gives_the_same_answer(served):
    client = _client(served)
    msgs = [{"role": "user", "content": "I lost my card"}]
    whole = client.chat.completions.create(model="tiny-intents@2", messages=msgs, max_tokens=6)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-intents@2", messages=msgs, max_tokens=6, stream=True)]
    assert "".join(pieces) == whole.choices[0].message.content


def test_feedback_log_and_metrics(served):
    client = _client(served)
    resp = client.chat.completions.create(model="tiny-intents", max_tokens=3, messages=[
        {"role": "user", "content": "my card never came, write to jane.doe@example.com"}])
    auth = {"Authorization": "Bearer sk-all"}
    ok = httpx.post(served["url"] + "/v1/feedback", headers=auth,
                    json={"response_id": resp.id, "rating": -1, "correction": "card_arrival"})
    assert ok.status_code == 200
    missing = httpx.post(served["url"] + "/v1/feedback", headers=auth, json={"response_id": "nope", "rating": 1})
    assert missing.status_code == 404
    log = served["app"].state.request_log
    row = next(r for r in log.rows() if r["id"] == resp.id)
    assert "<EMAIL>" in row["prompt"] and "jane.doe" not in row["prompt"]
    assert row["model_version"] == 1 and row["status"] == 200 and row["latency_ms"] > 0
    assert row["completion_tokens"] == resp.usage.completion_tokens
    # a classification adapter as the pipeline ships it (tuneline.yaml beside it): its answer as a label
    assert row["predicted_label"] == ((resp.choices[0].message.content or "").strip() or None)
    from tuneline.monitor.store import feedback_table

    assert [f["correction"] for f in log.rows(feedback_table) if f["response_id"] == resp.id] == ["card_arrival"]
    metrics = httpx.get(served["url"] + "/metrics", headers=auth).text
    assert 'tuneline_requests_total{endpoint="chat",model="tiny-intents",status="200"}' in metrics
    assert httpx.get(served["url"] + "/healthz", headers=auth).json()["status"] == "ok"
