"""The closed loop end to end on the tiny model (issue 19's acceptance): serve, in-distribution
traffic raises no alert, traffic from other intents fires the input-drift alert and the webhook
receives it once, corrections are posted, harvested into a dataset version, a retrained candidate
passes its gates and is promoted by policy, the running server answers from it without a
restart, and the lineage links the request ids the new rows came from."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import banking_rows, invoke_cli, tiny_lora_spec, uvicorn_on_loopback
from typer.testing import Result

import tuneline
from tuneline import registry
from tuneline.workspace import Workspace

NAME = "loop-intents"
KNOWN = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
OTHER = ["top_up_failed", "pin_blocked", "declined_transfer"]
WINDOW = 60


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP server on 127.0.0.1 collecting the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        thread.join(10)


def _later_rows(labels: list[str], skip: int, n: int) -> list[dict[str, str]]:
    """Training-file rows of ``labels`` after the first ``skip`` of each: never trained on."""
    rows = banking_rows(labels, skip + n)
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        seen[r["category"]] = seen.get(r["category"], 0) + 1
        if seen[r["category"]] > skip:
            out.append(r)
    return out


def _ask(url: str, text: str) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": NAME, "max_tokens": 4,
        "messages": [{"role": "system", "content": "Classify the message."}, {"role": "user", "content": text}]})
    r.raise_for_status()
    return r.json()


def _cli(*args: str) -> Result:
    return invoke_cli(*args)


def _check(spec: Path, ws: Workspace) -> tuple[int, dict]:
    res = _cli("monitor", "check", str(spec), "-w", str(ws.root), "--json")
    assert res.exit_code in (0, 4), res.output
    return res.exit_code, json.loads(res.stdout)


@pytest.mark.slow
def test_serve_monitor_alert_harvest_retrain_promote(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    with webhook_receiver() as (hook, received):
        # the tiny random model's answers are not labels, so its predicted-label distribution is
        # noise: the output detectors are exercised on BANKING77 (bench/monitor_banking77.py) and
        # in tests/unit/test_monitor_detectors.py; here the loop itself is under test
        spec = tiny_lora_spec(tmp_path, tiny_model_dir, NAME, per_label=40, extra=f"""
            monitor:
              window: {{requests: {WINDOW}, min_requests: 30, reference_rows: 120}}
              input: {{permutations: 200}}
              output: {{enabled: false}}
              alerts: {{sinks: [{{type: log}}, {{type: webhook, url: "{hook}"}}]}}
              feedback: {{corrections: true}}
              retrain: {{auto_promote: true}}
        """)
        v1 = tuneline.run(spec, workspace=ws, show_progress=False).model_version
        registry.promote(ws.tracking_uri, NAME, v1)
        from tuneline.serve import build_app

        app = build_app(ws, keys=None, resolve_ttl=0.0)
        try:
            with uvicorn_on_loopback(app) as url:
                for row in _later_rows(KNOWN, 40, WINDOW // 3):
                    assert _ask(url, row["text"])["model"] == f"{NAME}@{v1}"
                code, quiet = _check(spec, ws)
                assert code == 0, quiet["fired"]
                assert not [a for a in received if a["detector"].startswith("input.")]

                drift = _later_rows(OTHER, 0, WINDOW // 3)
                answered = [(_ask(url, row["text"])["id"], row) for row in drift]
                code, loud = _check(spec, ws)
                assert code == 4 and "input.embedding" in loud["fired"]
                _check(spec, ws)  # the same window again: no second alert
                assert [a["detector"] for a in received].count("input.embedding") == 1

                corrected = answered[: len(answered) // 2]
                for rid, row in corrected:
                    r = httpx.post(url + "/v1/feedback", json={"response_id": rid, "rating": -1,
                                                               "correction": row["category"]})
                    assert r.status_code == 200, r.text
                app.state.request_log.flush()

                harvested = _cli("feedback", "harvest", NAME, "--spec", str(spec), "-w", str(ws.root), "--json")
                assert harvested.exit_code == 0, harvested.output
                # the nightly job: the window still drifts, so the check retrains (its alert is not sent again)
                retrained = _cli("monitor", "check", str(spec), "-w", str(ws.root), "--retrain-on-alert", "--json")
                assert retrained.exit_code == 4, retrained.output
                v2 = json.loads(retrained.stdout)["retrain"]["candidate_version"]
                assert [a["detector"] for a in received].count("input.embedding") == 1
                assert v2 == v1 + 1
                info = registry.resolve(ws.tracking_uri, NAME)
                assert info.version == v2 and "production" in info.aliases  # promoted by policy

                assert _ask(url, drift[0]["text"])["model"] == f"{NAME}@{v2}"  # same server, no restart
        finally:
            app.state.engine.close()
            app.state.request_log.close()

    lineage = registry.lineage(ws.tracking_uri, ws.datasets_dir, NAME, v2)
    assert lineage["feedback"] is not None and lineage["feedback"]["rows"] == len(corrected)
    assert set(lineage["feedback"]["request_ids"]) == {rid for rid, _ in corrected}
