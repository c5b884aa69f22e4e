"""The model card of a real run (tiny model): written after registration, stored with the version,
listing that run's numbers; the adapter it sits in still loads and verifies; `tuneline card`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import invoke_cli, tiny_lora_spec
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

import tuneline
from tuneline.artifacts import ADAPTER_SHA_TAG, CARD_FILE, ArtifactError, tree_sha256, verify_tree
from tuneline.pipeline import RunResult
from tuneline.registry import VersionInfo, get_version
from tuneline.registry.card import BASE_MODEL_FILE, CARD_SHA_TAG, card_sha256
from tuneline.workspace import Workspace

NAME = "carded"


@dataclass
class Run:
    ws: Workspace
    result: RunResult
    version: VersionInfo
    model_dir: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Run:
    root = tmp_path_factory.mktemp("card")
    spec = tiny_lora_spec(root, tiny_model_dir, NAME, extra="baseline: {enabled: false}")  # its section: unit-tested
    ws = Workspace.at(root / "ws")
    result = tuneline.run(spec, workspace=ws, show_progress=False)
    assert result.model_version is not None
    return Run(ws, result, get_version(ws.tracking_uri, NAME, result.model_version), tiny_model_dir)


class _Out(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _cli(*args: str) -> _Out:
    result = invoke_cli(*args)
    return _Out(result.exit_code, result.stdout, result.stderr)


def _stored(run: Run, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(run.ws.tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(run.version.source, dst_path=str(dest)))


def test_the_card_lists_the_runs_real_numbers_and_validates(run: Run):
    card_path = run.result.run_dir / "adapter" / CARD_FILE
    text = card_path.read_text()
    card = ModelCard(text)  # Hugging Face's parser: raises on malformed metadata or model-index
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and "lora" in data["tags"] and "tuneline" in data["tags"]
    dataset = run.version.tags["tuneline.dataset_version"]
    assert data["datasets"] == [dataset]
    assert data["tuneline"]["version"] == run.version.version and data["tuneline"]["run_id"] == run.result.run_id
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == f"{NAME} version {run.version.version}"
    report = run.result.report
    assert report is not None
    test = report.main_set()
    cand, base = test.system("candidate"), test.system("base")
    assert cand is not None and base is not None
    assert {r.metric_type for r in results} == set(cand.metrics) == set(run.version.metrics)
    for r in results:  # this run's numbers: the registered metric tags and the EvalSuite
        assert r.metric_value == run.version.metrics[r.metric_type]
        assert r.metric_value == pytest.approx(cand.metrics[r.metric_type].value, rel=1e-5)
        assert r.dataset_type == dataset and r.task_type == "text-classification"
    for metric, est in cand.metrics.items():  # candidate beside base, with their intervals
        assert f"| {metric} | {est.fmt()} | {base.metrics[metric].fmt()} |" in text
    assert f"State: **{run.version.gate_state}**" in text
    assert run.version.tags[ADAPTER_SHA_TAG] in text and run.result.run_id in text
    assert f"{run.result.train.steps}" in text and "| train.seq_len | 96 |" in text
    # stored with the version, next to the adapter, and its hash recorded on the version
    assert run.version.tags[CARD_SHA_TAG] == card_sha256(text)


def test_the_adapter_names_its_base_portably_and_still_loads_and_verifies(run: Run, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneline.models import resolve_model_source
    from tuneline.pipeline.evaluation import load_adapter_model

    stored = _stored(run, tmp_path / "download")
    config_text = (stored / "adapter_config.json").read_text()
    config = json.loads(config_text)
    # no absolute path of this machine, no workspace path
    assert config["base_model_name_or_path"] == run.model_dir.name
    assert str(run.model_dir) not in config_text and str(run.ws.root) not in config_text
    assert str(Path.home()) not in config_text and str(tmp_path.parent) not in config_text
    base = json.loads((stored / BASE_MODEL_FILE).read_text())
    assert base["fingerprint"] == run.version.tags["tuneline.base_model_fingerprint"]
    # the card is in the stored adapter, and the hash recorded before it was written still holds:
    # the server's check (verify_tree) and retrain's accept the folder
    assert (stored / CARD_FILE).read_text() == (run.result.run_dir / "adapter" / CARD_FILE).read_text()
    recorded = run.version.tags[ADAPTER_SHA_TAG]
    assert tree_sha256(stored) == recorded
    verify_tree(stored, recorded)
    (stored / CARD_FILE).write_text("edited card")  # documentation only: no loader reads it
    verify_tree(stored, recorded)
    with (stored / "adapter_model.safetensors").open("r+b") as f:  # the weights are still covered
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ArtifactError, match="SHA-256"):
        verify_tree(stored, recorded)
    # the adapter as shipped loads onto the base from the spec (the server's and eval's way)
    adapter = run.result.run_dir / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.model_dir), str(adapter))
    assert model.peft_config["default"].base_model_name_or_path == run.model_dir.name
    load_adapter_model(resolve_model_source(str(run.model_dir)), run.ws, adapter, "cpu", "fp32")


def test_tuneline_card_prints_the_stored_card(run: Run, tmp_path: Path):
    stored = (run.result.run_dir / "adapter" / CARD_FILE).read_text()
    out = _cli("card", NAME, str(run.version.version), "-w", str(run.ws.root))
    assert out.returncode == 0, out.stderr
    assert out.stdout == stored
    target = tmp_path / "card.md"
    out = _cli("card", NAME, str(run.version.version), "-w", str(run.ws.root), "--out", str(target))
    assert out.returncode == 0, out.stderr
    assert target.read_text() == stored and out.stdout == ""


def test_a_version_without_a_card_gets_one_generated_and_says_so(run: Run):
    from mlflow import MlflowClient

    from tuneline.audit import trail_of

    # a version registered before cards existed: no card tag (its README.md was PEFT's template)
    client = MlflowClient(run.ws.tracking_uri)
    client.delete_model_version_tag(NAME, str(run.version.version), CARD_SHA_TAG)
    trail = trail_of(run.ws)
    entry = trail.append("register", subject=f"model:{NAME}/{run.version.version}", inputs={"run": run.result.run_id})
    trail.close()
    try:
        out = _cli("card", NAME, str(run.version.version), "-w", str(run.ws.root))
    finally:
        client.set_model_version_tag(NAME, str(run.version.version), CARD_SHA_TAG, run.version.tags[CARD_SHA_TAG])
    assert out.returncode == 0, out.stderr
    assert "no stored model card" in " ".join(out.stderr.split())
    assert "registered before tuneline wrote model cards" in out.stdout
    _, results = model_index_to_eval_results(ModelCard(out.stdout).data.to_dict()["model-index"])
    assert {r.metric_type: r.metric_value for r in results} == run.version.metrics
    assert f"| {entry.seq} | {entry.at} | {entry.actor} | register | ok | `{entry.hash}` |" in out.stdout
