"""Registry: runs become versions with lineage tags; promotion is gated; rollback undoes it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tuneline
from tuneline import registry
from tuneline.audit import trail_of
from tuneline.registry import RegistryError
from tuneline.workspace import Workspace


def _set_thresholds(spec: Path, thresholds: str) -> None:
    text = spec.read_text()
    start = text.index("thresholds:")
    end = text.index("\n", start)
    spec.write_text(text[:start] + f"thresholds: {thresholds}" + text[end:])


def _run(spec: Path, ws: Workspace, thresholds: str) -> int:
    _set_thresholds(spec, thresholds)
    result = tuneline.run(spec, workspace=ws, show_progress=False)
    assert result.model_version is not None
    return result.model_version


def _check_run_entries(ws: Workspace, info: registry.VersionInfo, train_csv: Path) -> None:
    """Version 1's run left data.prepare, train, eval, register and run entries naming the ids the
    registry holds; the trail verifies; no training text is in it."""
    trail = trail_of(ws)
    entries = trail.entries()
    assert [e.action for e in entries] == ["data.prepare", "train", "eval", "register", "run"] * 2
    prepare, train, evaluation, register, run = entries[:5]
    dataset = info.tags["tuneline.dataset_version"]
    assert prepare.outputs["dataset"] == dataset and len(prepare.inputs["sources.train"]) == 64
    assert train.inputs["dataset"] == dataset and train.outputs["run"] == info.run_id
    assert train.outputs["adapter"] == info.tags["tuneline.adapter_sha256"]
    assert evaluation.inputs["run"] == info.run_id and evaluation.outputs["gates"] == info.gate_state
    assert evaluation.details["metrics"]["accuracy"] == pytest.approx(info.metrics["accuracy"], abs=1e-5)
    assert register.outputs["model"] == "tiny-intents/1" and register.inputs["run"] == info.run_id
    assert run.outputs == {"run": info.run_id, "model": "tiny-intents/1"} and run.result == "ok"
    assert entries[0].actor.startswith("user:") and {e.actor for e in entries} == {entries[0].actor}
    assert [e.seq for e in trail.entries(refs=[info.run_id])] == [train.seq, evaluation.seq, register.seq, run.seq]
    assert trail.verify().ok
    texts = [row["text"] for row in csv.DictReader(train_csv.open())]
    exported = json.dumps([e.to_dict() for e in entries], ensure_ascii=False)
    assert texts and not any(t in exported for t in texts)
    trail.close()


def test_versions_promotion_rollback_and_lineage(classification_spec: Path, tmp_path: Path):
    ws = Workspace.at(tmp_path / "ws")
    uri = ws.tracking_uri
    v1 = _run(classification_spec, ws, '["accuracy >= 0.0"]')
    v2 = _run(classification_spec, ws, '["accuracy >= 0.99"]')  # this version's gate fails
    assert (v1, v2) == (1, 2)
    assert registry.resolve(uri, "tiny-intents@candidate").version == 2  # the latest trained version

    info = registry.get_version(uri, "tiny-intents", 1)
    assert info.gates_passed is True and "accuracy" in info.metrics
    assert info.tags["tuneline.dataset_version"].startswith("ds-")
    assert len(info.tags["tuneline.spec_sha256"]) == 64 and info.tags["tuneline.base_model_fingerprint"]

    _check_run_entries(ws, info, classification_spec.parent / "train.csv")
    trail = trail_of(ws)
    registry.promote(uri, "tiny-intents", 1, trail=trail)
    assert registry.resolve(uri, "tiny-intents").version == 1  # bare name: production
    with pytest.raises(RegistryError, match=r"cannot be promoted: its gates failed \(accuracy >= 0.99\)"):
        registry.promote(uri, "tiny-intents", 2, trail=trail)
    assert [(e.subject, e.result) for e in trail.entries(action="promote")] == [
        ("model:tiny-intents/1", "ok"), ("model:tiny-intents/2", "refused")]
    # re-evaluating version 2 under an edited spec whose threshold it meets is recorded as such,
    # and does not unlock its promotion: its gates are those of the spec it was trained with
    _set_thresholds(classification_spec, '["accuracy >= 0.0"]')
    assert tuneline.evaluate(classification_spec, workspace=ws, show_progress=False).passed
    with pytest.raises(RegistryError, match=r"its gates failed \(accuracy >= 0.99\); re-evaluations under other"):
        registry.promote(uri, "tiny-intents", 2)
    info2 = registry.get_version(uri, "tiny-intents", 2)
    assert info2.gate_state == "failed" and [r["gate_state"] for r in info2.reevaluations] == ["passed"]
    with pytest.raises(RegistryError, match="needs --reason"):
        registry.promote(uri, "tiny-intents", 2, force=True)
    registry.promote(uri, "tiny-intents", 2, force=True, reason="hotfix approved by the team", trail=trail)
    assert registry.resolve(uri, "tiny-intents").version == 2
    assert registry.rollback(uri, "tiny-intents", trail=trail) == (2, 1)
    forced, rolled = trail.entries()[-2:]
    assert (forced.action, forced.details["forced"], forced.details["reason"]) == (
        "promote", True, "hotfix approved by the team")
    assert forced.details["previous"] == "tiny-intents/1" and forced.outputs == {"production": "tiny-intents/2"}
    assert (rolled.action, rolled.inputs, rolled.outputs) == (
        "rollback", {"model": "tiny-intents/2"}, {"production": "tiny-intents/1"})
    trail.close()
    assert registry.resolve(uri, "tiny-intents@production").version == 1
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback(uri, "tiny-intents")
    last = registry.history(uri, "tiny-intents")[-2]
    assert last["forced"] and last["reason"] == "hotfix approved by the team" and last["gates"] == "failed"
    assert [e["reason"] for e in registry.history(uri, "tiny-intents") if e["version"] == 2
            and e["alias"] == "production"] == ["hotfix approved by the team"]  # never "gates passed"

    chain = registry.lineage(uri, ws.datasets_dir, "tiny-intents", 2)
    assert [s["split"] for s in chain["sources"]] == ["train", "test"]
    assert chain["dataset"]["id"] == info.tags["tuneline.dataset_version"]
    assert "decontaminate" in chain["dataset"]["steps"]
    assert chain["run"]["params"]["train.max_steps"] == "4" and chain["eval"]["gates_passed"] is False
    held = [(h["alias"], h["until"] is None) for h in chain["aliases_held"]]
    assert held == [("candidate", True), ("production", False)]  # production until the rollback

    env = {**os.environ, "COLUMNS": "200"}
    cli = [sys.executable, "-c", "from tuneline.cli import main; main()"]
    out = subprocess.run([*cli, "lineage", "tiny-intents", "2", "-w", str(ws.root)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    for piece in ("source files", "train.csv sha256", "-> dataset version ds-", "-> curation:",
                  "-> training run", "-> evaluation: gates FAILED", "under another spec", "gates passed; not "
                  "counted for promotion", "production:", "forced"):
        assert piece in out.stdout, piece
    out = subprocess.run([*cli, "promote", "tiny-intents", "2", "-w", str(ws.root)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 1 and "cannot be promoted" in out.stderr
    out = subprocess.run([*cli, "models", "tiny-intents", "-w", str(ws.root), "--json"], capture_output=True,
                         text=True, timeout=120, env=env)
    rows = json.loads(out.stdout)
    assert [(r["version"], r["aliases"]) for r in rows] == [(2, ["candidate"]), (1, ["production"])]
