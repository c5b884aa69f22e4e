"""The server's side of monitoring (issue 19): every completion request is a row of the store,
refused ones too (429, 404, 401, 400, 413) under their X-Request-Id and never twice; a
classification adapter's answers carry the label they predict; /metrics exports the store's last
check per model as gauges; and the shipped Prometheus rules use only metrics the server exposes.

Random LoRA adapters on the tiny model, served through a stand-in registry (no training run)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import tiny_engine, uvicorn_on_loopback

from tuneline.monitor.results import CheckResult, DetectorResult, Window
from tuneline.registry import VersionInfo
from tuneline.serve import Key, RequestLog, ServerConfig
from tuneline.serve.app import create_app
from tuneline.serve.tasks import AdapterTask

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "tuneline-alerts.yml"
KEY = "sk-ops"
AUTH = {"Authorization": f"Bearer {KEY}"}
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
SPEC = """name: {name}
task: {{type: {task}, labels: {labels}, instruction: Answer.}}
objective: {{primary: {primary}}}
model: smollm2-135m
data: {{train: {{path: train.csv}}}}
"""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """``intents`` (a classification spec beside it), ``chat`` (an instruction spec) and ``bare``
    (no spec): the same random LoRA weights."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("monitor-adapters")
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules="all-linear",
                                    init_lora_weights=False)).save_pretrained(root / "bare")
    for name, task, labels, primary in (("intents", "classification", LABELS, "accuracy"),
                                        ("chat", "instruction", None, "rouge_l")):
        shutil.copytree(root / "bare", root / name)
        (root / name / "tuneline.yaml").write_text(SPEC.format(name=name, task=task, primary=primary,
                                                               labels="null" if labels is None else labels))
    return {name: root / name for name in ("intents", "chat", "bare")}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    with tiny_engine(tiny_model_dir, max_batch=2) as eng:
        yield eng


@contextlib.contextmanager
def serve(engine: Any, adapters: dict[str, Path], tmp_path: Path, **config: Any) -> Iterator[tuple[str, Any]]:
    versions = {name: VersionInfo(name, 1, None, str(path), "", tags={}) for name, path in adapters.items()}

    def resolve(ref: str) -> VersionInfo:
        return versions[ref]  # KeyError: the resolver answers 404

    log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    app = create_app(engine, log, ServerConfig(
        registry_uri="unused", keys={KEY: Key("ops", {"*"}), "sk-narrow": Key("narrow", {"chat"})},
        resolve=resolve, adapters_path=lambda info: info.source, list_versions=lambda: [], base_name="base",
        **config))
    try:
        with uvicorn_on_loopback(app) as url:
            yield url, app.state.server
    finally:
        log.close()


def _chat(url: str, model: str, content: str = "my card has not arrived", key: str = KEY, **kw: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                            **kw})


def _rows(server: Any, count: int = 0) -> dict[str, dict[str, Any]]:
    """The request log's rows by id, once it holds ``count`` of them: a row is written after its
    response is sent, so a client can read its answer before the server has stored it."""
    deadline = time.monotonic() + 10
    rows = server.request_log.requests()
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.02)
        rows = server.request_log.requests()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a request was logged twice"
    return {r["id"]: r for r in rows}


def test_a_classification_adapter_logs_the_label_it_predicts(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as (url, server):
        answers = {name: _chat(url, name) for name in ("intents", "chat", "bare")}
        assert all(r.status_code == 200 for r in answers.values()), {k: r.text for k, r in answers.items()}
        streamed = _chat(url, "intents", stream=True)
        rows = _rows(server, count=4)
    got = {name: rows[r.json()["id"]] for name, r in answers.items()}
    text = answers["intents"].json()["choices"][0]["message"]["content"]
    assert got["intents"]["predicted_label"] == (text.strip() or None)
    assert got["chat"]["predicted_label"] is None and got["bare"]["predicted_label"] is None
    first = next(line for line in streamed.text.splitlines() if line.startswith("data: {"))
    stream_row = rows[json.loads(first[len("data: "):])["id"]]
    assert stream_row["status"] == 200 and stream_row["predicted_label"] == (stream_row["response"].strip() or None)
    assert len(rows) == 4


def test_the_predicted_label_is_spelled_as_the_spec_label():
    task = AdapterTask("classification", tuple(LABELS))
    assert task.predicted_label("  Card arrival.\n") == "card_arrival"
    assert task.predicted_label("lost-or-stolen card") == "lost_or_stolen_card"
    assert task.predicted_label(" something else ") == "something else"  # not a label: stored as answered
    assert task.predicted_label("  ") is None and task.predicted_label(None) is None
    assert AdapterTask("classification").predicted_label(" refund ") == "refund"  # labels from the data
    assert AdapterTask("summarization").predicted_label("card_arrival") is None


def test_refused_requests_are_stored_with_their_status_once(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path, max_body_bytes=4096) as (url, server):
        ok = _chat(url, "chat")
        server.admission.in_flight = server.admission.limit  # the server is full
        try:
            shed = _chat(url, "chat", content="are you busy?")
        finally:
            server.admission.in_flight = 0
        missing = _chat(url, "nope@7")
        unknown_key = _chat(url, "chat", key="sk-wrong")
        not_allowed = _chat(url, "intents", key="sk-narrow")
        too_long = _chat(url, "chat", content="word " * 600)  # past the tiny model's 512-token context
        too_big = httpx.post(url + "/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                             content=b'{"model": "chat", "prompt": "' + b"x" * 5000 + b'"}')
        rows = _rows(server, count=7)
    expected = {shed: (429, "chat", "ops"), missing: (404, "nope@7", "ops"), unknown_key: (401, None, None),
                not_allowed: (403, "intents", "narrow"), too_long: (400, "chat", "ops"),
                too_big: (413, None, "ops")}
    for response, (status, model, key) in expected.items():
        assert response.status_code == status, response.text
        row = rows[response.headers["x-request-id"]]  # stored under the id the client was given
        assert (row["status"], row["model"], row["key_name"]) == (status, model, key)
        assert row["response"] is None and row["completion_tokens"] is None and row["latency_ms"] > 0
        assert row["endpoint"] == ("completions" if response is too_big else "chat")
    assert rows[missing.headers["x-request-id"]]["model_name"] == "nope"
    assert "are you busy?" in rows[shed.headers["x-request-id"]]["prompt"]  # its body had been read
    assert rows[unknown_key.headers["x-request-id"]]["prompt"] is None  # refused before its body was read
    # the answered request: one row, under the response id (which is also its X-Request-Id)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == ok.json()["id"]
    assert rows[ok.json()["id"]]["status"] == 200
    assert len(rows) == len(expected) + 1


def test_a_request_past_its_deadline_is_stored_once_as_504(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path, request_timeout=0.05) as (url, server):
        late = _chat(url, "chat", max_tokens=450, content="tell me a long story")
        rows = _rows(server, count=1)
    assert late.status_code == 504
    assert list(rows) == [late.headers["x-request-id"]] and rows[late.headers["x-request-id"]]["status"] == 504


def _check(model: str, at: float, fired: bool) -> CheckResult:
    return CheckResult(model, 1, "intents@1", at, Window(at - 600, at, 120), [
        DetectorResult("input.embedding", "input", "alert" if fired else "ok", 0.42, 0.25, "MMD 0.42"),
        DetectorResult("output.labels", "output", "ok", 0.03, 0.1, "chi2"),
        DetectorResult("quality.negative_feedback", "quality", "insufficient", None, 0.2, "2 ratings"),
        DetectorResult("operations.latency_p95_ms", "operations", "info", 850.0, None, "p95"),
    ])


Sample = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted labels)


def _samples(text: str) -> dict[Sample, float]:
    """The samples of a /metrics text, whatever order their labels are written in."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            out[(name, tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels))))] = float(value)
    return out


def _key(name: str, **labels: str) -> Sample:
    return name, tuple(sorted(labels.items()))


def test_metrics_export_the_last_check_of_each_model(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as (url, server):
        server.request_log.save_check(_check("intents", 1000.0, fired=False))
        server.request_log.save_check(_check("intents", 2000.0, fired=True))  # the last: shown
        server.request_log.save_check(_check("chat", 1500.0, fired=False))
        samples = _samples(httpx.get(url + "/metrics", headers=AUTH).text)
    assert samples[_key("tuneline_monitor_value", model="intents", detector="input.embedding")] == 0.42
    assert samples[_key("tuneline_monitor_threshold", model="intents", detector="input.embedding")] == 0.25
    assert samples[_key("tuneline_monitor_alert", model="intents", detector="input.embedding")] == 1.0
    assert samples[_key("tuneline_monitor_alert", model="chat", detector="input.embedding")] == 0.0
    assert samples[_key("tuneline_monitor_alert", model="intents", detector="output.labels")] == 0.0
    assert samples[_key("tuneline_monitor_last_check_timestamp_seconds", model="intents")] == 2000.0
    assert samples[_key("tuneline_monitor_last_check_timestamp_seconds", model="chat")] == 1500.0
    # no value without data, no threshold where the detector only reports
    assert _key("tuneline_monitor_value", model="intents", detector="quality.negative_feedback") not in samples
    assert _key("tuneline_monitor_threshold", model="intents", detector="operations.latency_p95_ms") not in samples
    assert samples[_key("tuneline_monitor_value", model="intents", detector="operations.latency_p95_ms")] == 850.0


def test_metrics_read_the_store_at_most_once_per_cache_period(tmp_path):
    from tuneline.serve.metrics import MonitorGauges

    log = RequestLog(f"sqlite:///{tmp_path / 'requests.db'}")
    now = [0.0]
    gauges = MonitorGauges(log, cache_s=5.0, clock=lambda: now[0])
    try:
        assert gauges.latest() == []
        log.save_check(_check("intents", 1000.0, fired=True))
        now[0] = 4.9
        assert gauges.latest() == []  # cached
        now[0] = 5.1
        assert [c.at for c in gauges.latest()] == [1000.0]
        with log.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE checks")
        now[0] = 20.0
        assert [c.at for c in gauges.latest()] == [1000.0]  # the store fails: the last checks read stay
    finally:
        log.close()


def test_the_shipped_alert_rules_use_only_metrics_the_server_exposes(engine, adapters, tmp_path):
    with serve(engine, adapters, tmp_path) as (url, server):
        assert _chat(url, "chat").status_code == 200
        assert _chat(url, "nope").status_code == 404
        server.request_log.save_check(_check("chat", time.time(), fired=False))
        exposed = {name for name, _ in _samples(httpx.get(url + "/metrics", headers=AUTH).text)}
    rules = yaml.safe_load(RULES.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in alerts} >= {"TunelineDetectorFired", "TunelineMonitorCheckStale",
                                            "TunelineHighErrorRate", "TunelineHighShedRate",
                                            "TunelineHighLatencyP95"}
    for rule in alerts:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), rule["alert"]
        names = set(re.findall(r"\btuneline_[a-z0-9_]+", expr))
        assert names and names <= exposed, (rule["alert"], names - exposed)
