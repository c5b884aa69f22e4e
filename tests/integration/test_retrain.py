"""Retraining from feedback: the production version's recipe on its dataset plus the harvested
corrections, registered as a candidate, promoted only by policy with every gate passed; lineage
links the request ids to the dataset version and the model version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_lora_spec

import tuneline
from tuneline import registry
from tuneline.monitor.harvest import FeedbackError
from tuneline.monitor.store import RequestLog, RequestRecord
from tuneline.pipeline.retrain import PROMOTED_REASON, harvest_model, production_of, recipe, retrain
from tuneline.workspace import Workspace

NAME = "loop-intents"
CORRECTIONS = {  # request id -> (what the user wrote, the model's answer, the correction)
    "req-1": ("My new card still has not been delivered", "exchange_rate", "card_arrival"),
    "req-2": ("I think somebody stole my card at the station", "exchange_rate", "lost_or_stolen_card"),
    "req-3": ("Which rate applies when I pay in dollars abroad?", "card_arrival", "exchange_rate"),
}


def _variant(spec: Path, name: str, old: str, new: str) -> Path:
    text = spec.read_text()
    assert old in text
    out = spec.with_name(name)
    out.write_text(text.replace(old, new))
    return out


@pytest.mark.slow
def test_retrain_promotes_only_by_policy_and_lineage_links_requests(tmp_path: Path, tiny_model_dir: Path):
    spec = tiny_lora_spec(tmp_path, tiny_model_dir, NAME, extra="monitor: {retrain: {auto_promote: true}}")
    ws = Workspace.at(tmp_path / "ws")
    uri = ws.tracking_uri
    first = tuneline.run(spec, workspace=ws, show_progress=False)
    registry.promote(uri, NAME, first.model_version)

    log = RequestLog(ws.requests_url)
    for rid, (text, answer, _) in CORRECTIONS.items():
        log.log(RequestRecord(id=rid, endpoint="chat", model=NAME, model_name=NAME, model_version=1, key_name=None,
                              prompt=[{"role": "user", "content": text}], response=answer, prompt_tokens=9,
                              completion_tokens=2, finish_reason="stop", latency_ms=3.0, status=200))
    assert log.flush(10)
    for rid, (_, _, correction) in CORRECTIONS.items():
        log.add_feedback(rid, -1, correction, None)
    log.close(5)
    harvested = harvest_model(NAME, ws)  # the production version's shipped spec, its dataset's labels
    assert harvested.created and harvested.rows == 3 and harvested.request_ids == sorted(CORRECTIONS)

    prod = production_of(NAME, ws)
    assert prod.info.version == 1 and prod.loaded.spec.name == NAME and prod.loaded.path == spec.resolve()
    from rich.console import Console

    assert recipe(prod, Console()).max_steps == 3 and recipe(prod, Console()).lr == pytest.approx(3e-2)

    # an impossible gate: registered, not promoted, exit 3
    strict = _variant(spec, "strict.yaml", '"accuracy >= 0.0"', '"accuracy > 1.0"')
    env = {**os.environ, "COLUMNS": "200"}
    cli = [sys.executable, "-c", "from tuneline.cli import main; main()"]
    out = subprocess.run([*cli, "retrain", NAME, "--spec", str(strict), "-w", str(ws.root), "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"waits for `tuneline promote {NAME} 2`" in out.stdout
    assert registry.resolve(uri, NAME).version == 1 and registry.get_version(uri, NAME, 2).gate_state == "failed"

    # gates pass, but the policy leaves promotion to a person
    manual = _variant(spec, "manual.yaml", "auto_promote: true", "auto_promote: false")
    waiting = retrain(NAME, ws, spec=manual, show_progress=False)
    assert waiting.candidate_version == 3 and waiting.gate_state == "passed" and not waiting.promoted
    assert registry.resolve(uri, NAME).version == 1

    # the spec shipped with production: auto-promoted
    done = retrain(NAME, ws, show_progress=False)
    assert done.candidate_version == 4 and done.promoted and done.new_rows == 3
    assert registry.resolve(uri, NAME).version == 4
    assert registry.history(uri, NAME)[-1]["reason"] == PROMOTED_REASON
    assert done.request_ids == sorted(CORRECTIONS)
    assert done.base_dataset_version == first_dataset(uri) and done.dataset_version != done.base_dataset_version
    params = registry.lineage(uri, ws.datasets_dir, NAME, 4)["run"]["params"]
    assert params["train.max_steps"] == "3"  # the production recipe

    chain = registry.lineage(uri, ws.datasets_dir, NAME, 4)
    assert chain["dataset"]["id"] == done.dataset_version
    assert chain["feedback"] is not None and chain["feedback"]["request_ids"] == sorted(CORRECTIONS)
    assert chain["feedback"]["rows"] == 3 and chain["feedback"]["harvests"] == [harvested.version]
    out = subprocess.run([*cli, "lineage", NAME, "4", "-w", str(ws.root)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and "req-1, req-2, req-3" in out.stdout, out.stdout + out.stderr

    # everything harvested is now in production: nothing new to retrain on
    with pytest.raises(FeedbackError, match="0 new harvested rows"):
        retrain(NAME, ws, show_progress=False)
    out = subprocess.run([*cli, "retrain", NAME, "-w", str(ws.root), "--json"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 1 and "min_new_rows" in out.stderr
    assert json.loads((ws.datasets_dir / done.dataset_version / "harvest.json").read_text())["kind"] == "retrain"


def first_dataset(uri: str) -> str:
    return registry.get_version(uri, NAME, 1).tags["tuneline.dataset_version"]
