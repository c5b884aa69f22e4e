"""The server under load, faults and hostile input (issue 16): adapter slots that cannot collide,
verified adapters, alias-scoped and hashed keys, a bounded admission queue, deadlines, cancel on
disconnect, a body limit, protected /metrics and /healthz, the Host check, stop strings in
streams, and the OpenAI parameters we accept or refuse, checked with the `openai` client.

The apps here serve random LoRA adapters on the tiny model through a stand-in registry (no
training run), each under uvicorn on a free loopback port."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import tiny_engine, uvicorn_on_loopback

from tuneline.registry import VersionInfo
from tuneline.serve import Key, RequestLog, ServerConfig
from tuneline.serve.app import create_app

ALL, NARROW = "sk-all", "sk-narrow"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_encoder_dir: Path) -> dict[str, Path]:
    """Three random LoRA adapters (different weights); a and b ship a retrieval index each, with
    rows traced to "a:…" and "b:…"."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneline.data.examples import Example
    from tuneline.retrieval import build_index
    from tuneline.retrieval.encoder import load_encoder

    root = tmp_path_factory.mktemp("adapters")
    encoder = load_encoder(str(tiny_encoder_dir))
    out = {}
    for seed, name in enumerate(("a", "b", "c"), start=1):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(root / name)
        if name != "c":
            rows = [Example(f"{name}:{i}", ({"role": "user", "content": f"{name} question {i}"},
                                            {"role": "assistant", "content": "x"}), "x", "x") for i in range(3)]
            build_index(rows, encoder, root / f"idx-{name}").copy_to(root / name, k=1)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    with tiny_engine(tiny_model_dir, max_batch=4) as eng:
        yield eng


def _versions(adapters: dict[str, Path]) -> dict[str, VersionInfo]:
    from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256

    def v(name: str, version: int, path: Path, **tags: str) -> VersionInfo:
        return VersionInfo(name, version, None, str(path), "", tags=dict(tags))

    return {
        "acme-support": v("acme-support", 1, adapters["a"]), "acme_support": v("acme_support", 1, adapters["b"]),
        "solo-a": v("solo-a", 1, adapters["a"]), "solo-b": v("solo-b", 1, adapters["b"]),
        "support": v("support", 2, adapters["c"]), "support@production": v("support", 2, adapters["c"]),
        "support@candidate": v("support", 3, adapters["a"]), "support@3": v("support", 3, adapters["a"]),
        "signed": v("signed", 1, adapters["c"], **{ADAPTER_SHA_TAG: tree_sha256(adapters["c"])}),
    }


@contextlib.contextmanager
def serve(engine: Any, adapters: dict[str, Path], tmp_path: Path, keys: Any = None, **config: Any) -> Iterator[str]:
    versions = _versions(adapters) | config.pop("versions", {})
    if keys is None and "no_keys" not in config:
        keys = {ALL: Key("ops", {"*"}), NARROW: Key("narrow", {"support@production"})}
    config.pop("no_keys", None)
    log = config.pop("log", None) or RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")

    def resolve(ref: str) -> VersionInfo:
        return versions[ref]

    listed = [VersionInfo("support", 2, None, "", "", aliases=["production"]),
              VersionInfo("support", 3, None, "", "", aliases=["candidate"])]
    options = {"list_versions": lambda: listed, **config}
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    app = create_app(engine, log, ServerConfig(registry_uri="unused", keys=keys, resolve=resolve,
                                               adapters_path=lambda info: info.source, base_name="base",
                                               **{k: v for k, v in options.items() if k in known}))
    app.state.request_log = log
    with uvicorn_on_loopback(app) as url:
        yield url


def _openai(url: str, key: str = ALL):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _chat(url: str, model: str, content: str = "a question 1", key: str = ALL, **kw: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **kw})


def _rows(tmp_path: Path) -> list[dict[str, Any]]:
    return RequestLog(f"sqlite:///{tmp_path / 'requests.db'}").rows()


# --- defect 2: adapter slots -------------------------------------------------------------------

def test_names_that_differ_only_in_punctuation_get_their_own_adapter_and_index(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as url:
        dash, under = _chat(url, "acme-support").json(), _chat(url, "acme_support").json()
        alone_a, alone_b = _chat(url, "solo-a").json(), _chat(url, "solo-b").json()
    # each answers with its own adapter: as the same weights registered under an unambiguous name
    assert dash["choices"][0]["message"]["content"] == alone_a["choices"][0]["message"]["content"]
    assert under["choices"][0]["message"]["content"] == alone_b["choices"][0]["message"]["content"]
    assert dash["choices"][0]["message"]["content"] != under["choices"][0]["message"]["content"]
    # and retrieves from its own index
    assert [h["where"][:2] for h in dash["retrieved"]] == ["a:"]
    assert [h["where"][:2] for h in under["retrieved"]] == ["b:"]


# --- defect 6: the adapter is verified when the server loads it ------------------------------

def test_a_tampered_adapter_is_refused_with_a_clear_error(engine, adapters, tmp_path, caplog):
    import shutil

    from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256

    bad = tmp_path / "tampered"
    shutil.copytree(adapters["c"], bad)
    recorded = tree_sha256(bad)
    with (bad / "adapter_model.safetensors").open("r+b") as f:  # one byte of the weights changed
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    versions = {"tampered": VersionInfo("tampered", 1, None, str(bad), "", tags={ADAPTER_SHA_TAG: recorded})}
    with caplog.at_level("INFO", logger="tuneline.serve"), serve(engine, adapters, tmp_path, versions=versions) as url:
        r = _chat(url, "tampered")
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "adapter_verification_failed" and "SHA-256" in err["message"]
        assert _chat(url, "signed").status_code == 200  # an intact, recorded adapter; the server still serves
        assert _chat(url, "tampered").status_code == 500  # and never loads the tampered one later
    rid = r.headers["x-request-id"]
    assert any(rid in rec.getMessage() and rec.levelname == "ERROR" for rec in caplog.records)


# --- defect 3 / 7: keys ------------------------------------------------------------------------

def test_a_key_limited_to_an_alias_reaches_only_that_alias(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as url:
        assert _chat(url, "support", key=NARROW).status_code == 200
        assert _chat(url, "support@production", key=NARROW).status_code == 200
        for ref in ("support@candidate", "support@3", "acme-support"):
            r = _chat(url, ref, key=NARROW)
            assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", ref
        ids = {m.id for m in _openai(url, NARROW).models.list().data}
        assert ids == {"support", "support@production"}
    with serve(engine, adapters, tmp_path, keys={"sk-any": Key("any", {"support"})}) as url:
        assert all(_chat(url, ref, key="sk-any").status_code == 200
                   for ref in ("support", "support@candidate", "support@3"))  # a plain NAME: every version


def test_hashed_keys_and_a_broken_keys_file_that_does_not_print_the_key(engine, adapters, tmp_path):
    from tuneline.errors import TunelineError
    from tuneline.serve import hash_key, load_keys

    good = tmp_path / "keys.yaml"
    good.write_text(f"keys:\n  - name: team\n    sha256: {hash_key('sk-secret-team')}\n    models: [support]\n"
                    "  - name: scraper\n    key: sk-scrape\n    metrics: true\n")
    keys = load_keys(good)
    assert keys is not None and "sk-secret-team" not in good.read_text()
    with serve(engine, adapters, tmp_path, keys=keys) as url:
        assert _chat(url, "support", key="sk-secret-team").status_code == 200
        assert _chat(url, "support", key="sk-secret-tea").status_code == 401
        assert _chat(url, "support", key="sk-scrape").status_code == 403  # a metrics-only key
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-scrape"}).status_code == 200
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-secret-team"}).status_code == 403
    broken = tmp_path / "broken.yaml"
    broken.write_text("keys:\n  - name: team\n    key: sk-live-0123456789: models\n")
    with pytest.raises(TunelineError) as exc:
        load_keys(broken)
    message = str(exc.value) + "".join(p.message + str(p.hint) for p in exc.value.problems)
    assert "sk-live-0123456789" not in message and "line 3" in message


# --- defect 5: the server under load ----------------------------------------------------------

def test_a_full_queue_answers_429_with_retry_after(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path, max_queue=0) as url, httpx.Client(timeout=60) as client:
        auth = {"Authorization": f"Bearer {ALL}"}
        body = {"model": "base", "prompt": "tell me", "max_tokens": 400, "stream": True}
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(client.stream("POST", url + "/v1/completions", json=body, headers=auth))
                       for _ in range(engine.max_batch)]
            assert all(s.status_code == 200 for s in streams)
            r = client.post(url + "/v1/completions", json={**body, "stream": False}, headers=auth)
            assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
            assert int(r.headers["retry-after"]) >= 1
        for _ in range(200):  # the closed streams were cancelled and released their places
            if client.post(url + "/v1/completions", headers=auth,
                           json={**body, "stream": False, "max_tokens": 2}).status_code == 200:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the server stayed busy after its clients went away")


def test_a_request_past_its_deadline_is_ended_and_counted(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path, request_timeout=0.05) as url:
        r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {ALL}"}, timeout=60,
                       json={"model": "base", "prompt": "tell me", "max_tokens": 450})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ALL}"}).text
    assert 'tuneline_requests_total{endpoint="completions",model="base",status="504"} 1.0' in metrics
    row = _rows(tmp_path)[-1]
    assert row["status"] == 504 and row["completion_tokens"] < 450


def test_a_client_that_disconnects_mid_stream_stops_its_generation(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as url, httpx.Client(timeout=60) as client:
        body = {"model": "base", "prompt": "tell me a long story", "max_tokens": 450, "stream": True}
        with client.stream("POST", url + "/v1/completions", json=body,
                           headers={"Authorization": f"Bearer {ALL}"}) as s:
            next(s.iter_lines())  # the first chunk, then hang up
        for _ in range(400):
            rows = _rows(tmp_path)
            if rows:
                break
            time.sleep(0.025)
    assert len(rows) == 1, "the disconnected stream was not logged"
    assert rows[0]["status"] == 499 and rows[0]["finish_reason"] == "cancelled"
    assert rows[0]["completion_tokens"] < 450  # generation stopped early


def test_a_body_over_the_limit_gets_413_before_it_is_read(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path, max_body_bytes=4096) as url:
        auth = {"Authorization": f"Bearer {ALL}", "Content-Type": "application/json"}
        big = b'{"model": "base", "prompt": "' + b"x" * 10_000 + b'"}'
        r = httpx.post(url + "/v1/completions", content=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield big[:3000]
            yield big[3000:]

        r = httpx.post(url + "/v1/completions", content=chunks(), headers=auth)
        assert r.status_code == 413
        assert httpx.post(url + "/v1/completions", headers=auth, json={"model": "base", "prompt": "x",
                                                                      "max_tokens": 2}).status_code == 200


def test_metrics_and_healthz_need_a_key_and_every_status_is_counted(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as url:
        auth = {"Authorization": f"Bearer {ALL}"}
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {NARROW}"}).status_code == 403
        assert _chat(url, "support").status_code == 200
        assert _chat(url, "nope").status_code == 404
        assert _chat(url, "support", key="sk-wrong").status_code == 401
        assert httpx.get(url + "/v1/nothing-here", headers=auth).status_code == 404
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}  # nothing about what is served
        assert "adapters_loaded" in httpx.get(url + "/healthz", headers=auth).json()
        text = httpx.get(url + "/metrics", headers=auth).text
    for line in ('tuneline_requests_total{endpoint="chat",model="support",status="200"} 1.0',
                 'tuneline_requests_total{endpoint="chat",model="nope",status="404"} 1.0',
                 'tuneline_requests_total{endpoint="chat",model="",status="401"} 1.0',
                 'tuneline_requests_total{endpoint="other",model="",status="404"} 1.0',
                 'tuneline_requests_total{endpoint="metrics",model="",status="401"} 1.0',
                 "tuneline_requests_in_flight ", "tuneline_queue_depth ", "tuneline_batch_size_count",
                 'tuneline_time_to_first_token_seconds_count{endpoint="chat",model="support"} 1.0'):
        assert line in text, line
    with serve(engine, adapters, tmp_path, metrics_public=True) as url:
        assert httpx.get(url + "/metrics").status_code == 200


def test_without_keys_only_local_host_names_are_served(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path, no_keys=True) as url:
        r = httpx.get(url + "/v1/models", headers={"Host": "attacker.example"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert httpx.get(url + "/healthz", headers={"Host": host}).status_code == 200, host
    with serve(engine, adapters, tmp_path, no_keys=True, allowed_hosts=["tuneline.internal"]) as url:
        assert httpx.get(url + "/healthz", headers={"Host": "tuneline.internal:8000"}).status_code == 200
        assert httpx.get(url + "/healthz", headers={"Host": "attacker.example"}).status_code == 400


def test_stop_strings_apply_to_streamed_text(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as url:
        client = _openai(url)
        whole = client.completions.create(model="base", prompt="my card", max_tokens=24).choices[0].text
        # a 3-character stop string from the middle of the answer, whose first occurrence is not at its start
        stop = next(whole[k:k + 3] for k in range(len(whole) // 2, 0, -1) if whole.index(whole[k:k + 3]) > 0)
        want = whole[: whole.index(stop)]
        assert want and len(want) < len(whole) - 3
        plain = client.completions.create(model="base", prompt="my card", max_tokens=24, stop=[stop])
        assert plain.choices[0].text == want and plain.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model="base", prompt="my card", max_tokens=24, stop=[stop],
                                                stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_answer_is_kept_when_the_request_log_database_fails(engine, adapters, tmp_path):
    import shutil

    (tmp_path / "db").mkdir()
    log = RequestLog(f"sqlite:///{tmp_path / 'db' / 'requests.db'}", spool_dir=tmp_path / "spool")
    shutil.rmtree(tmp_path / "db")  # the database goes away while the server runs
    with serve(engine, adapters, tmp_path, log=log) as url:
        answer = _chat(url, "support")
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
        assert log.flush(timeout=30)
        auth = {"Authorization": f"Bearer {ALL}"}
        metrics = httpx.get(url + "/metrics", headers=auth).text
        assert 'tuneline_request_log_rows{state="in_spool"} 1.0' in metrics  # kept in the spool, not lost
        feedback = httpx.post(url + "/v1/feedback", headers=auth, json={"response_id": answer.json()["id"], "rating": 1})
        assert feedback.status_code == 503 and feedback.json()["error"]["code"] == "request_log_unavailable"
    (tmp_path / "db").mkdir()  # the database is back: the spooled row moves into it, once
    log.close()
    assert [r["id"] for r in RequestLog(f"sqlite:///{tmp_path / 'db' / 'requests.db'}").rows()] == [answer.json()["id"]]


# --- defect 8: OpenAI parity, with the openai client -----------------------------------------

def test_content_parts_developer_role_and_usage_in_streams(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as url:
        client = _openai(url)
        plain = client.chat.completions.create(model="support", max_tokens=5, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "where is my card"}])
        parts = client.chat.completions.create(model="support", max_tokens=5, messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "where is my card"}]}])
        assert parts.choices[0].message.content == plain.choices[0].message.content
        chunks = list(client.chat.completions.create(model="support", max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True}, messages=[
            {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "where is my card"}]))
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens <= 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content


@pytest.mark.parametrize(("param", "extra"), [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("tool_choice", {"tool_choice": "required"}),
    ("logprobs", {"logprobs": True}),
    ("top_logprobs", {"top_logprobs": 2}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("n", {"n": 2}),
    ("messages.0.content", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
])
def test_parameters_we_do_not_implement_are_refused_by_name(engine, adapters, tmp_path, param, extra):
    import openai

    with serve(engine, adapters, tmp_path) as url:
        kwargs = {"model": "support", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}
        with pytest.raises(openai.BadRequestError) as exc:
            _openai(url).chat.completions.create(**kwargs)
    assert exc.value.body["param"] == param and param in exc.value.body["message"]
    if param == "messages.0.content":
        assert "image_url" in exc.value.body["message"]
