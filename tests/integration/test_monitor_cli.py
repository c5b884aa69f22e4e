"""`tuneline monitor check` and `monitor report` on a registered version whose requests are
logged straight into the store (no model trained, the shipped sentence encoder): in-distribution
traffic passes with exit 0, other intents fire the input-drift alert (exit 4, one log alert per
window), a missing webhook token fails before anything is stored, and the report page shows the
detectors over time and the drifted inputs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from helpers import banking_rows, invoke_cli, tiny_lora_spec
from typer.testing import Result

from tuneline import context, registry
from tuneline.monitor.store import RequestLog, RequestRecord
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

NAME = "watched-intents"
KNOWN = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
OTHER = ["top_up_failed", "pin_blocked", "declined_transfer"]


def _cli(*args: str) -> Result:
    return invoke_cli(*args)


def _log(store: RequestLog, rows: list[dict[str, str]], tag: str) -> None:
    for i, row in enumerate(rows):
        store.log(RequestRecord(
            id=f"{tag}-{i}", endpoint="chat", model=NAME, model_name=NAME, model_version=1, key_name=None,
            prompt=[{"role": "system", "content": "Classify the message."}, {"role": "user", "content": row["text"]}],
            response=row["category"], prompt_tokens=30, completion_tokens=3, finish_reason="stop", latency_ms=40.0,
            status=200, predicted_label=row["category"]))
    assert store.flush(30)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """A production version of NAME (registered without training) with its dataset version, and
    a spec whose window is 60 requests."""
    tmp = tmp_path_factory.mktemp("monitor")
    spec = tiny_lora_spec(tmp, tiny_model_dir, NAME, per_label=40, extra="""
        monitor:
          window: {requests: 60, min_requests: 30, reference_rows: 120}
    """)
    ws = Workspace.at(tmp / "ws")
    _, version = context.prepare_version(load_spec(spec), ws)
    assert version is not None
    from mlflow import MlflowClient

    run_id = MlflowClient(tracking_uri=ws.tracking_uri).create_run("0").info.run_id
    tags = registry.version_tags(spec_sha256="a" * 64, dataset_version=version.id, code_version="test",
                                 base_model="tiny", base_fingerprint="f" * 64, suite=None)
    v = registry.register_version(ws.tracking_uri, NAME, run_id, "file:///nowhere/adapter", tags)
    registry.promote(ws.tracking_uri, NAME, v, force=True, reason="test: a version without evaluation")
    return {"spec": spec, "ws": ws}


def test_check_passes_quiet_traffic_and_alerts_once_on_other_intents(watched: dict, caplog) -> None:
    spec, ws = watched["spec"], watched["ws"]
    store = RequestLog(ws.requests_url)
    later = [r for r in banking_rows(KNOWN, 60) if r not in banking_rows(KNOWN, 40)]  # never trained on
    _log(store, later, "quiet")
    quiet = _cli("monitor", "check", str(spec), "-w", str(ws.root), "--json")
    assert quiet.exit_code == 0, quiet.output
    got = json.loads(quiet.stdout)
    assert got["fired"] == [] and got["window"]["requests"] == 60
    assert {r["name"] for r in got["results"]} >= {"input.embedding", "input.length", "input.oov", "output.labels",
                                                   "operations.error_rate", "quality.negative_feedback"}

    time.sleep(0.01)
    _log(store, banking_rows(OTHER, 20), "drift")
    store.close()
    with caplog.at_level(logging.WARNING, logger="tuneline.monitor"):
        loud = _cli("monitor", "check", NAME, "-w", str(ws.root), "--json")  # by name: production's shipped spec
    assert loud.exit_code == 1, loud.output  # the adapter's folder does not exist: the spec cannot be read
    assert "cannot read the spec shipped with" in str(loud.exception or loud.output)

    loud = _cli("monitor", "check", str(spec), "-w", str(ws.root))
    assert loud.exit_code == 4, loud.output
    assert "input.embedding" in loud.output and "ALERT" in loud.output and "alerts sent" in loud.output
    again = _cli("monitor", "check", str(spec), "-w", str(ws.root))
    assert again.exit_code == 4 and "already sent for this window: " in again.output
    assert [a["detector"] for a in RequestLog(ws.requests_url).alerts_sent(NAME)].count("input.embedding") == 1

    page = _cli("monitor", "report", str(spec), "-w", str(ws.root))
    assert page.exit_code == 0, page.output
    html = Path(page.stdout.strip()).read_text()
    assert "input.embedding" in html and "Drifted inputs" in html
    assert any(r["text"][:30] in html for r in banking_rows(OTHER, 20))  # a drifted input shown as an example


def test_a_missing_webhook_token_fails_before_anything_is_stored(watched: dict, tmp_path: Path) -> None:
    ws = watched["ws"]
    spec = tmp_path / "tuneline.yaml"
    text = Path(watched["spec"]).read_text().replace(
        "  window:", "  alerts: {sinks: [{type: webhook, url: 'http://127.0.0.1:9/x', token_env: TL_NO_SUCH_TOKEN}]}\n"
                     "  window:")
    spec.write_text(text)
    for f in ("train.csv", "test.csv"):
        (tmp_path / f).write_text((Path(watched["spec"]).parent / f).read_text())
    before = len(RequestLog(ws.requests_url).checks(NAME))
    res = _cli("monitor", "check", str(spec), "-w", str(ws.root))
    assert res.exit_code == 1 and "TL_NO_SUCH_TOKEN" in str(res.exception or res.output)
    assert len(RequestLog(ws.requests_url).checks(NAME)) == before
