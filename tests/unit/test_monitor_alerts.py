"""Alerts: the payload a webhook receives, the log line, delivery to a real HTTP receiver on
loopback with its bearer token, deduplication over overlapping windows, and retries that neither
lose an alert nor stop the other sinks."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from monitor_samples import MemoryLedger, check, detector

from tuneline.errors import TunelineError
from tuneline.monitor.alerts import (
    AlertOutcome,
    LogAlertSink,
    WebhookAlertSink,
    alert_payload,
    build_sinks,
    redact_url,
    send_alerts,
)
from tuneline.spec.monitor import AlertsSpec, LogSink, WebhookSink

HOUR = 3600.0
T0 = 1_700_000_000.0


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST; answers ``status`` (a queue of codes,
    then 200)."""

    url: str
    posts: list[tuple[dict, dict[str, str]]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    @property
    def bodies(self) -> list[dict]:
        return [b for b, _ in self.posts]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.posts.append((json.loads(body), dict(self.headers.items())))
            code = rec.answers.pop(0) if rec.answers else 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/secret-path"
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _webhook(rec: Receiver, **kw: object) -> WebhookAlertSink:
    sleeps: list[float] = []
    sink = WebhookAlertSink(url=rec.url, timeout_s=5.0, sleep=sleeps.append, **kw)  # type: ignore[arg-type]
    sink.sleeps = sleeps  # type: ignore[attr-defined]
    return sink


def test_payload_has_stable_json_keys_and_no_nan() -> None:
    fired = detector("input.embedding", value=0.21, threshold=0.05, p_value=0.001,
                     extra={"low": float("nan"), "method": "mmd"})
    c = check([fired, detector("output.labels", value=0.01, threshold=0.15)], start=T0, end=T0 + HOUR)
    payload = alert_payload(c, fired)
    assert list(payload)[:2] == ["event", "payload_version"]
    assert payload["event"] == "tuneline.monitor.alert"
    for key in ("model", "version", "dataset_version", "detector", "group", "value", "threshold", "p_value",
                "detail", "window_start", "window_end", "window_requests", "checked_at", "checked_at_utc", "text"):
        assert key in payload, key
    assert payload["model"] == "support-bot" and payload["version"] == 3
    assert payload["detector"] == "input.embedding" and payload["group"] == "input"
    assert payload["window_start"] == T0 and payload["window_end"] == T0 + HOUR
    assert payload["checked_at_utc"] == "2023-11-14T23:13:20Z"
    assert payload["extra"] == {"low": None, "method": "mmd"}  # NaN is not JSON: null
    json.dumps(payload, allow_nan=False)
    assert "input.embedding = 0.21 above its threshold 0.05" in str(payload["text"])


def test_log_sink_writes_one_warning_line_per_alert(caplog: pytest.LogCaptureFixture) -> None:
    c = check([detector("input.embedding"), detector("output.labels", value=0.4, threshold=0.15),
               detector("quality.negative_feedback", value=0.01, threshold=0.2)], start=T0, end=T0 + HOUR)
    with caplog.at_level(logging.WARNING, logger="tuneline.monitor"):
        out = send_alerts(c, [LogAlertSink()], MemoryLedger())
    assert out.sent == ["input.embedding", "output.labels"]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("tuneline alert: support-bot v3: input.embedding")


def test_webhook_gets_one_post_per_window_with_the_bearer_token(receiver: Receiver) -> None:
    [sink] = build_sinks(AlertsSpec(sinks=[WebhookSink(type="webhook", url=receiver.url, token_env="HOOK_TOKEN")]),
                         env={"HOOK_TOKEN": "t0ps3cret"})
    ledger = MemoryLedger()
    fired = detector("input.embedding")
    # two checks whose windows overlap: one alert
    first = send_alerts(check([fired], start=T0, end=T0 + 2 * HOUR), [sink], ledger)
    second = send_alerts(check([fired], start=T0 + HOUR, end=T0 + 3 * HOUR), [sink], ledger)
    assert first.sent == ["input.embedding"] and second.deduplicated == ["input.embedding"]
    assert second.lines() == ["alerts already sent for this window: input.embedding"]
    assert len(receiver.posts) == 1
    body, headers = receiver.posts[0]
    assert headers["Authorization"] == "Bearer t0ps3cret"
    assert headers["Content-Type"] == "application/json"
    assert body["detector"] == "input.embedding" and body["window_end"] == T0 + 2 * HOUR
    assert "t0ps3cret" not in json.dumps(body)  # the token never goes in the payload
    # a window past the alerted one: a new alert
    third = send_alerts(check([fired], start=T0 + 3 * HOUR + 1, end=T0 + 5 * HOUR), [sink], ledger)
    assert third.sent == ["input.embedding"]
    assert [b["window_start"] for b in receiver.bodies] == [T0, T0 + 3 * HOUR + 1]


def test_each_detector_is_deduplicated_on_its_own(receiver: Receiver) -> None:
    sink = _webhook(receiver)
    ledger = MemoryLedger()
    send_alerts(check([detector("input.embedding")], start=T0, end=T0 + HOUR), [sink], ledger)
    out = send_alerts(check([detector("input.embedding"), detector("output.labels", value=0.5, threshold=0.15)],
                            start=T0 + 60, end=T0 + HOUR + 60), [sink], ledger)
    assert out.sent == ["output.labels"] and out.deduplicated == ["input.embedding"]
    assert [b["detector"] for b in receiver.bodies] == ["input.embedding", "output.labels"]


def test_a_failing_receiver_is_retried_reported_and_sent_again_next_check(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    sink = _webhook(receiver, retries=2, backoff_s=0.25)
    ledger = MemoryLedger()
    fired = detector("input.embedding")
    receiver.answers = [500, 503, 500]  # every attempt of the first check fails
    with caplog.at_level(logging.ERROR, logger="tuneline.monitor"):
        first = send_alerts(check([fired], start=T0, end=T0 + HOUR), [sink], ledger)
    assert len(receiver.posts) == 3  # one try and two retries
    assert sink.sleeps == [0.25, 0.5]  # type: ignore[attr-defined]  # short backoff, doubling
    assert first.failed == ["input.embedding"] and not first.sent and not first.ok
    [delivery] = first.deliveries
    assert not delivery.ok and delivery.attempts == 3 and "HTTP 500" in str(delivery.error)
    assert "secret-path" not in str(delivery.error)  # the URL's path may hold a secret: not shown
    assert any("input.embedding not delivered" in r.getMessage() for r in caplog.records)
    assert ledger.claims == []  # released: not marked as sent
    assert first.lines()[0] == "alerts NOT delivered (retried at the next check): input.embedding"
    assert "HTTP 500" in first.lines()[1]
    # the next check, overlapping window: the alert is sent now
    second = send_alerts(check([fired], start=T0 + 60, end=T0 + HOUR + 60), [sink], ledger)
    assert second.sent == ["input.embedding"]
    assert len(receiver.posts) == 4
    assert len(ledger.claims) == 1


def test_a_retry_succeeds_within_the_same_check(receiver: Receiver) -> None:
    sink = _webhook(receiver)
    receiver.answers = [502]
    out = send_alerts(check([detector()], start=T0, end=T0 + HOUR), [sink], MemoryLedger())
    assert out.sent == ["input.embedding"] and out.deliveries[0].attempts == 2
    assert len(receiver.posts) == 2


def test_a_client_error_is_not_retried(receiver: Receiver) -> None:
    sink = _webhook(receiver)
    receiver.answers = [401]
    out = send_alerts(check([detector()], start=T0, end=T0 + HOUR), [sink], MemoryLedger())
    assert out.failed == ["input.embedding"] and "HTTP 401" in str(out.deliveries[0].error)
    assert len(receiver.posts) == 1


def test_an_unreachable_webhook_does_not_stop_the_log_sink(caplog: pytest.LogCaptureFixture) -> None:
    dead = WebhookAlertSink(url="http://127.0.0.1:9/hook", timeout_s=1.0, retries=1, sleep=lambda s: None)
    ledger = MemoryLedger()
    with caplog.at_level(logging.WARNING, logger="tuneline.monitor"):
        out = send_alerts(check([detector()], start=T0, end=T0 + HOUR), [dead, LogAlertSink()], ledger)
    assert out.per_sink() == {"webhook http://127.0.0.1:9/...": {"sent": [], "failed": ["input.embedding"]},
                              "log": {"sent": ["input.embedding"], "failed": []}}
    assert any(r.getMessage().startswith("tuneline alert:") for r in caplog.records)
    assert "not reachable" in str(out.deliveries[0].error) and out.deliveries[0].attempts == 2
    assert out.failed == ["input.embedding"] and ledger.claims == []  # the webhook gets it next time


def test_a_crashing_sink_is_reported_and_the_others_still_run(receiver: Receiver) -> None:
    class Broken:
        name = "broken"

        def send(self, payload: object) -> int:
            raise RuntimeError("bug")

    out = send_alerts(check([detector()], start=T0, end=T0 + HOUR), [Broken(), _webhook(receiver)], MemoryLedger())
    assert [d.ok for d in out.deliveries] == [False, True] and len(receiver.posts) == 1
    assert "RuntimeError" in str(out.deliveries[0].error)


def test_no_fired_detector_sends_nothing(receiver: Receiver) -> None:
    c = check([detector(value=0.01), detector("output.labels", value=None)], start=T0, end=T0 + HOUR)
    out = send_alerts(c, [_webhook(receiver)], MemoryLedger())
    assert out == AlertOutcome() and receiver.posts == []


def test_missing_token_variable_names_it() -> None:
    spec = AlertsSpec(sinks=[LogSink(type="log"), WebhookSink(type="webhook", url="https://hooks.example/T000/secret", token_env="TL_HOOK")])
    with pytest.raises(TunelineError) as e:
        build_sinks(spec, env={})
    text = str(e.value)
    assert "TL_HOOK" in text and "not set" in text and "monitor.alerts.sinks[1].token_env" in text
    assert "secret" not in text
    sinks = build_sinks(spec, env={"TL_HOOK": "x"})
    assert [s.name for s in sinks] == ["log", "webhook https://hooks.example/..."]


def test_default_spec_is_the_log_sink() -> None:
    assert [s.name for s in build_sinks(AlertsSpec(), env={})] == ["log"]


def test_redact_url_keeps_only_scheme_host_port() -> None:
    assert redact_url("https://user:pw@hooks.slack.com/services/T0/B0/xyz?a=1") == "https://hooks.slack.com/..."
    assert redact_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
