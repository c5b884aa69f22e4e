"""The spec's monitor section: defaults, validation with lines, and reading a logged prompt's input."""

from __future__ import annotations

import json

from helpers import spec_error

from tuneline.spec import MonitorSpec, WebhookSink


def test_defaults_need_significance_and_effect_and_log_alerts() -> None:
    m = MonitorSpec()
    assert m.window.min_requests <= m.window.requests
    assert m.input.p_value <= 0.001 and m.input.min_effect > 0  # both must hold before an alert
    assert [s.type for s in m.alerts.sinks] == ["log"]
    assert m.retrain.auto_promote is False  # a person promotes unless the spec says otherwise


def test_webhook_sink_and_bad_window_are_reported_with_their_field() -> None:
    m = MonitorSpec.model_validate({"alerts": {"sinks": [{"type": "webhook", "url": "http://127.0.0.1:9/x"}]}})
    assert isinstance(m.alerts.sinks[0], WebhookSink)


def test_a_window_that_can_never_give_a_verdict_is_refused(tmp_path) -> None:
    msg = spec_error(tmp_path, "monitor: {window: {requests: 20, min_requests: 50}}")
    assert "min_requests (50) is more than monitor.window.requests (20)" in msg
    msg = spec_error(tmp_path, "monitor: {alerts: {sinks: [{type: email}]}}")
    assert "monitor" in msg and "sinks" in msg


def test_a_logged_prompt_is_read_as_its_input_without_the_system_prompt() -> None:
    from tuneline.monitor.check import request_input

    messages = [{"role": "system", "content": "Classify."}, {"role": "user", "content": "my card is lost"}]
    assert request_input(json.dumps(messages)) == "my card is lost"
    assert request_input(json.dumps("a raw completion prompt")) == "a raw completion prompt"
    assert request_input(None) == ""


def test_too_few_permutations_for_the_p_value_are_refused(tmp_path) -> None:
    msg = spec_error(tmp_path, "monitor: {input: {method: mmd, permutations: 500, p_value: 0.001}}")
    assert "cannot give a p-value below monitor.input.p_value (0.001)" in msg and "1999" in msg


def test_a_spec_written_back_without_defaults_keeps_its_alert_sinks() -> None:
    import yaml

    from tuneline.spec import parse_spec

    body = """
name: x
task: {type: classification}
objective: {primary: accuracy}
model: smollm2-135m
data: {train: {path: train.csv}}
monitor: {alerts: {sinks: [{type: log}, {type: webhook, url: "http://127.0.0.1:9/hook"}]}}
"""
    spec = parse_spec(body)
    again = parse_spec(yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True)))  # as retrain writes it
    assert [s.type for s in again.monitor.alerts.sinks] == ["log", "webhook"]
