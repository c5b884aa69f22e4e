"""Governance end to end on the tiny model: a person's row is trained on, erased, the version that
carries it is marked, `retrain` makes a clean version, and the audit trail holds every step (with
ids and counts, never the erased text) and verifies."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import invoke_cli, tiny_lora_spec

import tuneline
from tuneline import registry
from tuneline.audit import trail_of
from tuneline.curation import load_version
from tuneline.curation.steps import text_of
from tuneline.workspace import Workspace

NAME = "gov-intents"
PERSON = "Jane Q. Doe-Example"


def _cli(*args: str) -> str:
    result = invoke_cli(*args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_erasure_marks_the_trained_version_and_retrain_makes_a_clean_one(tmp_path: Path, tiny_model_dir: Path):
    spec = tiny_lora_spec(tmp_path, tiny_model_dir, NAME, extra="monitor: {retrain: {auto_promote: true}}")
    with (tmp_path / "train.csv").open("a", newline="") as f:
        csv.writer(f).writerow([f"This is {PERSON}, my card never arrived at my home", "card_arrival"])
    ws = Workspace.at(tmp_path / "ws")
    uri, w = ws.tracking_uri, str(ws.root)
    first = tuneline.run(spec, workspace=ws, show_progress=False)
    registry.promote(uri, NAME, first.model_version)
    trained_on = registry.get_version(uri, NAME, 1).tags["tuneline.dataset_version"]
    before = load_version(trained_on, ws.datasets_dir)
    assert any(PERSON in text_of(r) for split in ("train", "validation") for r in before.split(split))

    _cli("data", "forget", "--contains", PERSON.lower(), "-w", w)
    listed = json.loads(_cli("models", NAME, "-w", w, "--json"))
    assert [(v["version"], v["carries_erased_data"]) for v in listed] == [(1, True)]

    _cli("retrain", NAME, "-w", w, "--no-progress")
    listed = json.loads(_cli("models", NAME, "-w", w, "--json"))
    assert [(v["version"], v["carries_erased_data"]) for v in listed] == [(2, False), (1, True)]
    clean = registry.get_version(uri, NAME, 2)
    assert "production" in clean.aliases  # gates passed; the spec's policy promotes
    for split in ("train", "validation", "test"):
        texts = [text_of(r) for r in load_version(clean.tags["tuneline.dataset_version"], ws.datasets_dir).split(split)]
        assert not any(PERSON.lower() in t.lower() for t in texts)

    trail = trail_of(ws)
    entries = trail.entries()
    actions = [e.action for e in entries]
    assert actions.index("data.forget") < actions.index("retrain")
    forget = entries[actions.index("data.forget")]
    assert forget.outputs[f"model.{NAME}/1"] == f"{NAME}/1" and forget.outputs[f"dataset.{trained_on}"] == trained_on
    retrained = entries[actions.index("retrain")]
    assert retrained.outputs["model"] == f"{NAME}/2" and retrained.details["promoted"] is True
    assert [e.subject for e in trail.entries(action="promote")][-1] == f"model:{NAME}/2"
    exported = _cli("audit", "export", "-w", w)
    assert PERSON.lower() not in exported.lower() and "Doe-Example" not in exported
    assert trail.verify().ok
    trail.close()
