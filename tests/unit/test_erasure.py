"""Erasure (`tuneline data forget`): after a request the erased text is nowhere in the workspace's
dataset versions, their MLflow copies, the request and feedback log, the harvested feedback or the
audit export; other rows stay; a later prepare does not bring the row back; the model version
trained on it is marked; the request is stored only as keyed digests."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from helpers import tiny_lora_spec
from typer.testing import CliRunner

from tuneline.audit import trail_of
from tuneline.cli import app
from tuneline.curation import curate, load_version, save_version
from tuneline.curation.erasure import ErasureError, erase_key, load_filter, parse_query
from tuneline.curation.forget import file_texts
from tuneline.monitor.harvest import harvest
from tuneline.monitor.store import RequestLog, RequestRecord, feedback_table
from tuneline.pipeline.forget import forget
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

NAME = "intents"
SECRET = "Zoë Quartermaine"  # the data subject's name, in several places and forms
SECRET_ROW = "Hi, this is ZOË  QUARTERMAINE, my card still has not arrived"  # other case, spacing
KEPT_ROW = "Where is the card you sent me last week?"


def _record(rid: str, user: str, answer: str) -> RequestRecord:
    return RequestRecord(id=rid, endpoint="chat", model=NAME, model_name=NAME, model_version=1, key_name=None,
                         prompt=[{"role": "user", "content": user}], response=answer, prompt_tokens=10,
                         completion_tokens=2, finish_reason="stop", latency_ms=5.0, status=200)


def _append_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writerows(rows)


@pytest.fixture
def world(tmp_path: Path):
    """A workspace with: a dataset version holding the secret in a training row and in a reject
    (a conflict), a harvested version from feedback on a request naming it, the request log, and
    a registered model version trained on the first dataset version (its manifest and card logged
    to MLflow)."""
    spec = tiny_lora_spec(tmp_path, tmp_path, NAME)
    _append_rows(tmp_path / "train.csv", [
        {"text": SECRET_ROW, "category": "card_arrival"},
        {"text": KEPT_ROW, "category": "card_arrival"},
        {"text": f"Is {SECRET} allowed to exchange pounds?", "category": "exchange_rate"},
        {"text": f"is {SECRET.upper()} allowed to exchange pounds?", "category": "lost_or_stolen_card"},  # conflict
    ])
    loaded = load_spec(spec)
    ws = Workspace.at(tmp_path / "ws")
    v1 = save_version(curate(loaded), ws.datasets_dir, NAME, loaded.sha256)

    log = RequestLog(ws.requests_url)
    log.log(_record("r-secret", f"I am {SECRET}; my card got stolen yesterday", "card_arrival"))
    log.log(_record("r-other", "How long does a card take to arrive?", "exchange_rate"))
    assert log.flush(10)
    log.add_feedback("r-secret", -1, "lost_or_stolen_card", None)
    log.add_feedback("r-other", -1, "card_arrival", f"says {SECRET}")  # a comment naming her
    harvested = harvest(loaded, ws, log)
    assert harvested.created
    log.close(5)

    from tuneline import registry, tracking

    with tracking.start_run(loaded, ws) as run:  # artifacts in the workspace, as `tuneline run` logs them
        tracking.log_dataset_version(v1)
    tags = registry.version_tags(spec_sha256=loaded.sha256, dataset_version=v1.id, code_version="test",
                                 base_model="tiny", base_fingerprint="0" * 64)
    assert registry.register_version(ws.tracking_uri, NAME, run.info.run_id, f"runs:/{run.info.run_id}/adapter",
                                     tags) == 1
    return loaded, ws, v1, harvested.version


def _all_texts(ws: Workspace) -> list[tuple[str, str]]:
    """(place, text) for every text of the dataset versions, MLflow artifacts, feedback files,
    the request log's requests and feedback, and the audit export."""
    out = []
    for root in (ws.datasets_dir, ws.artifact_root, ws.feedback_root):
        for path in root.rglob("*"):
            if path.is_file():
                out += [(str(path), t) for t in file_texts(path)]
    log = RequestLog(ws.requests_url)
    try:
        out += [("requests", json.dumps(r, ensure_ascii=False)) for r in log.rows()]
        out += [("requests", str(r["prompt"])) for r in log.rows()]  # JSON-escaped prompts decoded below
        out += [("feedback", json.dumps(r, ensure_ascii=False)) for r in log.rows(feedback_table)]
    finally:
        log.close(5)
    exported = CliRunner().invoke(app, ["audit", "export", "-w", str(ws.root), "--format", "jsonl"])
    assert exported.exit_code == 0, exported.output
    out.append(("audit export", exported.output))
    db = (ws.root / "requests.db").read_bytes()  # the file itself: no deleted row left in free pages
    out.append(("requests.db bytes", db.decode("utf-8", "replace")))
    return out


def _holding(ws: Workspace, text: str) -> list[str]:
    needle = erase_key(text)
    return sorted({place for place, t in _all_texts(ws) if needle in erase_key(t)
                   or needle in erase_key(_unescape(t))})


def _unescape(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


def test_forget_leaves_no_trace_and_marks_the_model(world):
    loaded, ws, v1, hv = world
    assert _holding(ws, SECRET)  # it is there before: the scan sees it
    assert any("requests.db" in p for p in _holding(ws, SECRET))
    stem = ws.stems_dir / "stem-0.safetensors"  # frozen-layer states a training stored (computed from its rows)
    stem.write_bytes(b"states")

    result = forget(ws, parse_query(None, "zoe quartermaine".replace("zoe", "zoë")))
    eid = result.erasure_id
    assert result.stems == 1 and not stem.exists() and result.counts()["stems"] == 1

    assert _holding(ws, SECRET) == []
    assert _holding(ws, KEPT_ROW)  # a row that does not match stays
    assert any(str(v1.path) in p for p in _holding(ws, KEPT_ROW))
    assert result.log is not None and (result.log.requests, result.log.feedback) == (1, 2)

    # the versions keep their ids; their manifests record the erasure with counts, never content
    m = load_version(v1.id, ws.datasets_dir).manifest
    assert [e["id"] for e in m["erasures"]] == [eid]
    # the training row, and the two conflicting rows curation rejected (and the manifest's conflict group)
    assert m["erasures"][0]["removed"]["train"] == 1 and m["erasures"][0]["rejects"] == 2
    assert m["erasures"][0]["conflicts"] == 1 and m["conflicts"] == []
    assert m["counts"]["train"] == len(load_version(v1.id, ws.datasets_dir).split("train"))
    assert set(result.affected) >= {v1.id, hv}
    assert eid in load_version(v1.id, ws.datasets_dir).card.read_text()
    assert result.versions[0].artifacts == 1  # the MLflow copy of the manifest was rewritten

    # harvested links stay consistent: every link names a row of the (shorter) train split
    links = json.loads((ws.datasets_dir / hv / "requests.json").read_text())
    assert "r-secret" not in links["request_ids"]
    assert all(r["row"] < len(load_version(hv, ws.datasets_dir).split("train")) for r in links["rows"])

    # the model version trained on v1 is marked, and `models --json` says it carries erased data
    out = CliRunner().invoke(app, ["models", "--json", "-w", str(ws.root)])
    assert out.exit_code == 0, out.output
    row = next(r for r in json.loads(out.output) if r["version"] == 1)
    assert row["carries_erased_data"] is True and row["erasures"] == [eid]
    assert [(m.name, m.version) for m in result.models] == [(NAME, 1)]

    # one audit entry: ids and counts, nothing of the text (checked above through the export)
    trail = trail_of(ws)
    entries = trail.entries(action="data.forget")
    trail.close()
    assert len(entries) == 1 and entries[0].outputs["erasure"] == eid
    assert entries[0].outputs[f"dataset.{v1.id}"] == v1.id and entries[0].outputs[f"model.{NAME}/1"] == f"{NAME}/1"
    assert entries[0].details["requests"] == 1 and entries[0].details["feedback"] == 2

    # the stored request is a keyed digest: neither the text nor a plain hash of it
    stored = (ws.erasure_dir / "erasures.jsonl").read_text()
    assert hashlib.sha256(erase_key(SECRET).encode()).hexdigest()[:32] not in stored
    assert stat.S_IMODE(os.stat(ws.erasure_dir / "key").st_mode) == 0o600

    # a later prepare of the same spec does not bring the rows back, and counts them as erased
    v2 = save_version(curate(loaded, erased=load_filter(ws)), ws.datasets_dir, NAME, loaded.sha256)
    assert v2.id != v1.id and v2.manifest["dropped_by_reason"]["erased"] == 3
    assert not any(SECRET.casefold() in json.dumps(r, ensure_ascii=False).casefold() for r in v2.rejects())
    assert _holding(ws, SECRET) == []

    # a version trained after the erasure on the clean dataset version is not marked
    from tuneline import registry

    v1_info = registry.get_version(ws.tracking_uri, NAME, 1)
    tags = {**{k: x for k, x in v1_info.tags.items() if not k.startswith(registry.ERASURE_PREFIX)},
            "tuneline.dataset_version": v2.id}
    assert registry.register_version(ws.tracking_uri, NAME, str(v1_info.run_id), v1_info.source, tags) == 2
    out = CliRunner().invoke(app, ["models", "--json", "-w", str(ws.root)])
    assert {r["version"]: r["carries_erased_data"] for r in json.loads(out.output)} == {1: True, 2: False}


def test_dry_run_changes_nothing_and_shows_the_rows(world):
    _, ws, v1, _ = world

    def tree() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for root in (ws.datasets_dir, ws.feedback_root, ws.artifact_root)
                for p in root.rglob("*") if p.is_file()}

    (ws.stems_dir / "stem-0.safetensors").write_bytes(b"states")
    before = tree()
    out = CliRunner().invoke(app, ["data", "forget", "--contains", SECRET, "--dry-run", "-w", str(ws.root)],
                             env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert "stored frozen-layer states" in out.output and (ws.stems_dir / "stem-0.safetensors").exists()
    assert "would remove" in out.output and v1.id in out.output and "QUARTERMAINE" in out.output  # the terminal
    assert f"{NAME} version 1" in out.output
    assert tree() == before
    assert load_filter(ws) is None
    trail = trail_of(ws)
    assert trail.entries(action="data.forget") == []
    trail.close()


def test_match_is_one_field_and_normalized(world):
    loaded, ws, v1, _ = world
    before = {ex.reference for ex in load_version(v1.id, ws.datasets_dir).split("train")}
    result = forget(ws, parse_query(f"text={KEPT_ROW.upper()}   ", None))  # case and spaces ignored
    train = load_version(v1.id, ws.datasets_dir).split("train")
    assert not any(ex.messages[-2]["content"] == KEPT_ROW for ex in train)
    assert any("QUARTERMAINE" in ex.messages[-2]["content"] for ex in train)  # another row: untouched
    assert {ex.reference for ex in train} == before
    assert result.versions[0].removed["train"] + result.versions[0].removed["test"] \
        + result.versions[0].removed["validation"] == 1
    # a later prepare drops the row as erased
    v2 = save_version(curate(loaded, erased=load_filter(ws)), ws.datasets_dir, NAME, loaded.sha256)
    assert v2.manifest["dropped_by_reason"]["erased"] == 1


@pytest.mark.parametrize(("args", "message"), [
    ([], "give exactly one of --match COLUMN=VALUE and --contains TEXT"),
    (["--match", "text=a", "--contains", "b"], "give exactly one of"),
    (["--match", "email=x@y.z"], "unknown column 'email'"),
    (["--match", "text"], "--match needs COLUMN=VALUE"),
    (["--contains", "   "], "not empty"),
])
def test_bad_requests_are_refused(tmp_path: Path, args: list[str], message: str):
    out = CliRunner().invoke(app, ["data", "forget", *args, "-w", str(tmp_path / "ws")], env={"COLUMNS": "300"})
    assert out.exit_code != 0
    assert message in str(out.exception or "") + out.output
    with pytest.raises(ErasureError):
        parse_query(*(["text=a", "b"] if "--contains" in args and "--match" in args else [None, None]))


def test_erase_key_normalizes_like_curation():
    assert erase_key("ＺＯＥ\u200b  Quarter\u00admaine\n") == erase_key("zoe quartermaine")
    assert erase_key("Straße") == erase_key("STRASSE")
