"""Fuzzing the served API in-process: schemathesis drives the app's own OpenAPI schema (valid and
schema-violating requests, with and without a valid key), then a hand-written list of hostile
bodies the schema cannot describe. Whatever a client sends, the answer is never a 5xx, and every
4xx is an OpenAI-style JSON error: ``{"error": {"message": ..., "type": ..., ...}}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

import tuneline
from tuneline import registry
from tuneline.serve import Key, build_app
from tuneline.workspace import Workspace

# a hung engine fails the test instead of the whole run
pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-intents"
KEYS = {"sk-fuzz": Key("fuzz", {"*"}), "sk-narrow": Key("narrow", {"another-model"})}
AUTH = {"Authorization": "Bearer sk-fuzz"}
# Requests with a missing, wrong, malformed or out-of-scope key.
BAD_AUTH: list[dict[str, str]] = [
    {}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"},
    {"Authorization": "Basic c2stZnV6ejo="}, {"Authorization": "sk-fuzz"}, {"Authorization": "bearer  sk-fuzz2"},
    {"Authorization": "Bearer sk-narrow"},
]
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
              ("POST", "/v1/feedback"), ("GET", "/healthz"), ("GET", "/metrics")]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# Valid and schema-violating requests; the GET endpoints take no parameters, so nothing in their
# schema can be violated (they get junk query strings instead).
CASES = [pytest.param(m, p, mode, id=f"{m} {p} {mode}") for m, p in OPERATIONS
         for mode in ([POSITIVE] if m == "GET" else [POSITIVE, NEGATIVE])]
# Small and fixed, so a run is fast and the same on every machine.
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """The served app over a registry with one tiny LoRA version in production."""
    from helpers import tiny_lora_spec

    spec = tiny_lora_spec(tmp_path_factory.mktemp("serve-fuzz"), tiny_model_dir, MODEL, per_label=4, max_steps=1)
    tmp = spec.parent
    ws = Workspace.at(tmp / "ws")
    assert tuneline.run(spec, workspace=ws, show_progress=False).model_version == 1
    registry.promote(ws.tracking_uri, MODEL, 1)
    served = build_app(ws, keys=KEYS, resolve_ttl=0.0)
    yield served
    served.state.engine.close()


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    # a server error comes back as a 500 to assert on, not as an exception in the test
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def targets(client) -> dict[str, list[str]]:
    """Model names the app serves and a logged response, so fuzzed requests get past the lookups."""
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert f"{MODEL}@1" in ids and MODEL in ids
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "my card", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    return {"model": ids, "response_id": [r.json()["id"]]}


@pytest.fixture(scope="module")
def api_schema(app):
    """The app's OpenAPI schema, loaded in-process; requests go straight to the ASGI app."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = {(method.upper(), path) for path, ops in schema.raw_schema["paths"].items() for method in ops}
    assert operations == set(OPERATIONS)  # a new endpoint gets fuzzed too: add it to OPERATIONS
    return schema


def assert_openai_error(status: int, body: bytes) -> None:
    """A 4xx carries ``{"error": {"message": str, "type": str, "param": ..., "code": ...}}``."""
    assert status < 500, f"server error {status}: {body[:500]!r}"
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"], body
        assert isinstance(err["type"], str) and err["type"], body
        assert {"param", "code"} <= set(err), body


def steer(case: Any, data: st.DataObject, targets: dict[str, list[str]]) -> None:
    """Often point a generated request at a model that exists (with a small token budget) or at a
    logged response, so the fuzzing gets past the lookups to tokenization, the context check,
    generation and the feedback store; and send junk query strings to the GET endpoints."""
    if case.method.upper() == "GET":
        text = st.text(st.characters(codec="utf-8"), max_size=40)
        case.query = data.draw(st.dictionaries(text, text, max_size=3), label="query")
        return
    body = case.body
    if not isinstance(body, dict) or not data.draw(st.booleans(), label="steer"):
        return
    if case.path == "/v1/feedback":
        body["response_id"] = data.draw(st.sampled_from(targets["response_id"]), label="response_id")
        return
    body["model"] = data.draw(st.sampled_from(targets["model"]), label="model")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 8:
            body[field] = data.draw(st.integers(1, 8), label=field)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = data.draw(st.integers(1, 8), label="max_tokens")


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz_with_a_valid_key(api_schema, targets, method, path, mode):
    """Requests that fit the schema (positive) and that break it (negative), with a key for "*"."""

    @FUZZ
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode), data=st.data())
    def fuzz(case, data):
        steer(case, data, targets)
        response = case.call(headers=AUTH)
        case.validate_response(response, checks=[not_a_server_error], headers=AUTH)
        assert_openai_error(response.status_code, response.content)

    fuzz()


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_fuzz_without_a_valid_key(api_schema, method, path, mode):
    """The same with a missing, wrong, malformed or out-of-scope key: a 401 (or 403) before anything else."""

    @settings(FUZZ, max_examples=15)
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode), auth=st.sampled_from(BAD_AUTH),
           data=st.data())
    def fuzz(case, auth, data):
        if method == "GET":
            steer(case, data, {})
        response = case.call(headers=auth)
        case.validate_response(response, checks=[not_a_server_error], headers=auth)
        assert_openai_error(response.status_code, response.content)
        if path.startswith("/v1/") and auth.get("Authorization") != "Bearer sk-narrow":
            assert response.status_code == 401, response.text

    fuzz()


# --- hostile requests the schema cannot describe ------------------------------------------------

CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/v1/feedback"
MSG = [{"role": "user", "content": "hi"}]


def chat(**over: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **over}


def completion(**over: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "my card", "max_tokens": 2, **over}


def deep(n: int) -> str:
    return "[" * n + "]" * n


HOSTILE: list[tuple[str, str, Any]] = [
    # (id, path, body: bytes sent as is, or anything else sent as JSON)
    ("empty", CHAT, b""),
    ("not-json", CHAT, b"{not json"),
    ("truncated", COMPLETIONS, b'{"model": "tiny-intents", "prompt": "x'),
    ("invalid-utf8", CHAT, b'{"model": "\xff\xfe", "messages": []}'),
    ("utf16-bom", CHAT, "\ufeff".encode("utf-16") + json.dumps(chat()).encode("utf-16")),
    ("null", CHAT, b"null"),
    ("array", COMPLETIONS, b"[]"),
    ("number", FEEDBACK, b"42"),
    ("string", CHAT, b'"hello"'),
    ("nan-temperature", CHAT, json.dumps(chat(temperature=float("nan"))).encode()),
    ("inf-max-tokens", COMPLETIONS, b'{"model": "tiny-intents", "prompt": "x", "max_tokens": Infinity}'),
    ("1e999-max-tokens", COMPLETIONS, b'{"model": "tiny-intents", "prompt": "x", "max_tokens": 1e999}'),
    ("deeply-nested-array", CHAT, deep(100_000).encode()),
    ("deeply-nested-field", CHAT, ('{"model": "tiny-intents", "messages": ' + deep(50_000) + "}").encode()),
    ("nested-junk", CHAT, chat(messages=[{"role": "user", "content": {"a": [{"b": [None, 1.5, True]}]}}])),
    ("duplicate-keys", CHAT, b'{"model": "x", "model": "tiny-intents", "messages": [{"role": "user", "content": "x"}], '
                             b'"max_tokens": 2}'),
    ("huge-model-name", CHAT, chat(model="m" * 1_000_000)),
    ("huge-content", CHAT, chat(messages=[{"role": "user", "content": "card " * 200_000}])),
    ("huge-prompt", COMPLETIONS, completion(prompt="x" * 1_000_000)),
    ("many-messages", CHAT, chat(messages=MSG * 10_000)),
    ("many-stops", COMPLETIONS, completion(stop=["a"] * 100_000)),
    ("huge-extra-field", CHAT, chat(junk="j" * 1_000_000)),
    ("extra-fields", CHAT, chat(tools=[{"type": "function"}], logprobs=True, seed=-1, response_format={"x": 1},
                                frequency_penalty=1e308)),
    ("wrong-types", CHAT, {"model": ["tiny-intents"], "messages": {"role": "user"}, "max_tokens": "2",
                           "temperature": "hot", "stream": "yes", "stop": 5, "n": None}),
    ("bool-as-int", CHAT, chat(max_tokens=True)),
    ("float-max-tokens", CHAT, chat(max_tokens=2.5)),
    ("negative-max-tokens", CHAT, chat(max_tokens=-(2**63))),
    ("huge-max-tokens", CHAT, chat(max_tokens=10**40)),
    ("zero-max-tokens", COMPLETIONS, completion(max_completion_tokens=0)),
    ("max-tokens-4096", CHAT, chat(max_tokens=4096)),
    ("negative-temperature", CHAT, chat(temperature=-1)),
    ("huge-temperature", CHAT, chat(temperature=1e308)),
    ("denormal-temperature", CHAT, chat(temperature=5e-324)),
    ("tiny-temperature", COMPLETIONS, completion(temperature=1e-30, max_tokens=4)),
    ("negative-zero-temperature", COMPLETIONS, completion(temperature=-0.0)),
    ("n-2", CHAT, chat(n=2)),
    ("content-parts", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])),
    ("null-content", CHAT, chat(messages=[{"role": "user", "content": None}])),
    ("tool-role", CHAT, chat(messages=[{"role": "tool", "content": "x"}])),
    ("assistant-only", CHAT, chat(messages=[{"role": "assistant", "content": "x"}])),
    ("system-only", CHAT, chat(messages=[{"role": "system", "content": ""}])),
    ("empty-messages", CHAT, chat(messages=[])),
    ("empty-prompt", COMPLETIONS, completion(prompt="")),
    ("empty-prompt-list", COMPLETIONS, completion(prompt=[])),
    ("two-prompts", COMPLETIONS, completion(prompt=["a", "b"])),
    ("token-id-prompt", COMPLETIONS, completion(prompt=[1, 2, 3])),
    ("empty-stop", COMPLETIONS, completion(stop=["", ""])),
    ("nul-bytes", CHAT, chat(messages=[{"role": "user", "content": "a\x00b"}], stop="\x00", user="\x00")),
    ("unicode", COMPLETIONS, completion(prompt="\u202e\u200b\U0001f600\u0301\ufffd\U0010ffff", stop=["\U0001f600"])),
    ("unicode-model", CHAT, chat(model="tiny-intents\u0000@\U0001f600/../..")),
    ("path-model", COMPLETIONS, completion(model="../../etc/passwd")),
    ("odd-refs", COMPLETIONS, completion(model="tiny-intents@")),
    ("odd-refs-2", COMPLETIONS, completion(model="tiny-intents@-1")),
    ("odd-refs-3", COMPLETIONS, completion(model="tiny-intents@99999999999999999999999")),
    ("odd-refs-4", COMPLETIONS, completion(model="@@@")),
    ("odd-refs-5", COMPLETIONS, completion(model="tiny-intents@production@1")),
    ("sql-model", COMPLETIONS, completion(model="x' OR '1'='1")),
    ("lone-surrogate-content", CHAT, b'{"model": "tiny-intents", "max_tokens": 2, '
                                     b'"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("lone-surrogate-prompt", COMPLETIONS, b'{"model": "tiny-intents", "max_tokens": 2, "prompt": "a\\udfffb"}'),
    ("lone-surrogate-model", COMPLETIONS, b'{"model": "\\ud800", "prompt": "x"}'),
    ("lone-surrogate-stop", COMPLETIONS, b'{"model": "tiny-intents", "max_tokens": 2, "prompt": "x", "stop": "\\udc00"}'),
    ("lone-surrogate-user", CHAT, b'{"model": "tiny-intents", "max_tokens": 2, "user": "\\ud800", '
                                  b'"messages": [{"role": "user", "content": "x"}]}'),
    ("stream-lone-surrogate", CHAT, b'{"model": "tiny-intents", "max_tokens": 2, "stream": true, '
                                    b'"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("stream-tiny-temperature", COMPLETIONS, completion(stream=True, temperature=1e-300)),
    ("stream-context-exceeded", COMPLETIONS, completion(stream=True, max_tokens=4096)),
    ("feedback-empty", FEEDBACK, {}),
    ("feedback-nothing", FEEDBACK, {"response_id": "x"}),
    ("feedback-missing-id", FEEDBACK, {"response_id": "nope", "rating": 1}),
    ("feedback-rating-range", FEEDBACK, {"response_id": "x", "rating": 10**30}),
    ("feedback-rating-float", FEEDBACK, {"response_id": "x", "rating": 1.5}),
    ("feedback-long-id", FEEDBACK, {"response_id": "x" * 65, "rating": 1}),
    ("feedback-huge-correction", FEEDBACK, {"response_id": "x", "correction": "c" * 1_000_000}),
    ("feedback-lone-surrogate-id", FEEDBACK, b'{"response_id": "\\ud800", "rating": 1}'),
    ("feedback-lone-surrogate-text", FEEDBACK, b'{"response_id": "x", "correction": "\\udfff", "comment": "\\ud800"}'),
    ("feedback-nul", FEEDBACK, {"response_id": "a\x00b", "rating": 1, "comment": "\x00"}),
]


@pytest.mark.parametrize(("path", "body"), [pytest.param(p, b, id=i) for i, p, b in HOSTILE])
def test_hostile_bodies_get_a_4xx_or_an_answer(client, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r.status_code, r.content)


@pytest.mark.parametrize(("method", "path", "headers", "content"), [
    ("POST", CHAT, {"Content-Type": "text/plain"}, json.dumps(chat()).encode()),
    ("POST", CHAT, {"Content-Type": "application/x-www-form-urlencoded"}, b"model=tiny-intents&messages=hi"),
    ("POST", CHAT, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x\r\n\r\n--x--"),
    ("POST", CHAT, {}, json.dumps(chat()).encode()),
    ("POST", CHAT, {"Content-Type": "application/json; charset=latin-1"}, '{"model": "\xe9"}'.encode("latin-1")),
    ("POST", CHAT, {"Content-Encoding": "gzip", "Content-Type": "application/json"}, b"\x1f\x8bjunk"),
    ("GET", CHAT, {}, None),
    ("DELETE", "/v1/models", {}, None),
    ("POST", "/healthz", {}, None),
    ("PUT", "/metrics", {}, None),
    ("GET", "/v1/nope", {}, None),
    ("GET", "/nope", {}, None),
    ("GET", "/v1/models?limit=-1&%ff=%00", {}, None),
    ("GET", "/v1//models", {}, None),
    ("GET", "/v1/models/../../healthz", {}, None),
    ("OPTIONS", CHAT, {}, None),
])
def test_wrong_methods_paths_and_content_types_get_a_4xx(client, method, path, headers, content):
    r = client.request(method, path, headers={**AUTH, **headers}, content=content)
    assert_openai_error(r.status_code, r.content)


@pytest.mark.parametrize("body", [
    b'{"response_id": "%s", "rating": 1, "correction": "\\ud800"}',
    b'{"response_id": "%s", "rating": -1, "comment": "x\\udfff"}',
    b'{"response_id": "%s", "rating": 1, "correction": "\\u0000\\ufffd", "comment": "%s"}',
])
def test_feedback_with_hostile_text_on_a_logged_response(client, body):
    rid = client.post(COMPLETIONS, json=completion(), headers=AUTH).json()["id"]
    content = body.replace(b"%s", rid.encode(), 1).replace(b"%s", b"c" * 20_001)
    r = client.post(FEEDBACK, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r.status_code, r.content)


def test_what_the_fuzzing_found_is_a_4xx(client):
    """Each was a 500 or a non-OpenAI ``{"detail": ...}`` body before the fixes in serve/app.py."""
    headers = {**AUTH, "Content-Type": "application/json"}
    # a lone surrogate (JSON may escape one) reached the tokenizer and the request log: 500
    r = client.post(CHAT, headers=headers,
                    content=b'{"model": "tiny-intents", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    r = client.post(COMPLETIONS, headers=headers, content=b'{"model": "tiny-intents", "prompt": ["\\udfff"]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    # a body FastAPI cannot decode (bad UTF-8, nesting too deep), an unknown path, a wrong method
    for method, path, content, status in [("POST", CHAT, b'{"model": "\xff"}', 400),
                                          ("POST", CHAT, deep(100_000).encode(), 400),
                                          ("GET", "/v1/nope", None, 404), ("GET", CHAT, None, 405)]:
        r = client.request(method, path, headers=headers, content=content)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_the_server_still_answers_after_the_fuzzing(client):
    r = client.post(CHAT, json=chat(max_tokens=3), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == f"{MODEL}@1"
    assert client.get("/healthz").json()["status"] == "ok"
