"""The audit trail of real commands: a run appends data.prepare, train, eval, register and run
entries that name the same ids the registry holds; promotion (also a refused one), a forced
promotion with its reason and a rollback are entries; nothing in the trail quotes a data row."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from typer.testing import CliRunner

from tuneline import registry
from tuneline.audit import trail_of
from tuneline.cli import app
from tuneline.errors import TunelineError
from tuneline.workspace import Workspace


def _cli(*args: str) -> tuple[int, str]:
    handlers = list(logging.root.handlers)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        logging.root.handlers[:] = handlers
    if isinstance(result.exception, TunelineError):  # main() prints it and exits 1
        return 1, result.exception.render()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_a_run_and_its_promotions_leave_a_verifiable_trail(classification_spec: Path, tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    w = str(ws.root)
    code, _ = _cli("run", str(classification_spec), "-w", w, "--no-progress")
    assert code in (0, 3)
    trail = trail_of(ws)
    entries = trail.entries()
    assert [e.action for e in entries] == ["data.prepare", "train", "eval", "register", "run"]
    info = registry.get_version(ws.tracking_uri, "tiny-intents", 1)
    prepare, train, evaluation, register, run = entries
    dataset = info.tags["tuneline.dataset_version"]
    assert prepare.outputs["dataset"] == dataset and prepare.inputs["sources.train"] == info.tags.get(
        "tuneline.data.train.sha256", prepare.inputs["sources.train"])
    assert train.inputs["dataset"] == dataset and train.outputs["run"] == info.run_id
    assert train.outputs["adapter"] == info.tags["tuneline.adapter_sha256"]
    assert evaluation.inputs["run"] == info.run_id and evaluation.outputs["gates"] == info.gate_state
    assert evaluation.details["metrics"]["accuracy"] == round(info.metrics["accuracy"], 6)
    assert register.outputs["model"] == "tiny-intents/1" and register.inputs["run"] == info.run_id
    assert run.outputs == {"run": info.run_id, "model": "tiny-intents/1"} and run.result == "ok"
    assert {e.actor for e in entries} == {entries[0].actor} and entries[0].actor.startswith("user:")
    assert [e.seq for e in trail.entries(refs=[info.run_id])] == [train.seq, evaluation.seq, register.seq, run.seq]

    # promotion: refused when the gates failed, forced with a reason, then rolled back
    gates_passed = info.gate_state == "passed"
    code, _ = _cli("promote", "tiny-intents", "1", "-w", w)
    assert code == (0 if gates_passed else 1)
    code, _ = _cli("promote", "tiny-intents", "1", "-w", w, "--force", "--reason", "ticket OPS-12: approved")
    assert code == 0
    promotions = trail.entries(action="promote")
    assert [p.result for p in promotions] == (["ok", "ok"] if gates_passed else ["refused", "ok"])
    assert promotions[-1].details["reason"] == "ticket OPS-12: approved"
    assert promotions[-1].details["forced"] is (not gates_passed)
    assert promotions[-1].outputs == {"production": "tiny-intents/1"}

    code, out = _cli("audit", "verify", "-w", w)
    assert code == 0 and "intact" in out
    code, out = _cli("audit", "export", "-w", w, "--format", "jsonl")
    exported = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in exported] == list(range(1, len(exported) + 1))
    # ids and hashes only: no training text in the trail
    texts = [row["text"] for row in csv.DictReader((classification_spec.parent / "train.csv").open())]
    assert texts and not any(t in out for t in texts)
    trail.close()
