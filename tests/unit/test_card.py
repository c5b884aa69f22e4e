"""Model cards from recorded facts (no training): metadata that Hugging Face's parser accepts, the
suite's numbers, limitations derived from facts, the audit entries; portable base-model names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from report_samples import make_suite

from tuneline.audit import AuditTrail
from tuneline.models.sources import BUILTIN_MODELS, ModelSource, portable_model_name
from tuneline.registry import VersionInfo, eval_tags
from tuneline.registry.card import CardFacts, DataFile, limitations, render
from tuneline.spec import parse_spec

SPEC = """
name: banking77-intents
task: {type: classification, instruction: Classify the message.}
objective: {primary: accuracy, thresholds: ["accuracy >= 0.75", "macro_f1 >= 0.90"]}
model: smollm2-135m
data:
  train: {path: data/train.csv, columns: {label: category}}
  test: {path: data/test.csv, columns: {label: category}}
"""


def _option(name: str, value: float, vs_best: float, skipped: str | None = None) -> dict[str, object]:
    return {"name": name, "description": f"the {name} option", "metrics": {"accuracy": {"value": value, "low": value - 0.03,
            "high": value + 0.03}}, "one_off_seconds": 1.0, "p50_ms": 40.0, "p95_ms": 70.0, "prompt_tokens": 30.0,
            "vs_best": {"value": vs_best, "low": vs_best - 0.04, "high": min(vs_best + 0.04, 0.0)}, "p_vs_best": 0.01,
            "skipped": skipped}


BASELINES = {"set": "test", "n": 1001, "metric": "accuracy", "best": "fine_tuned", "recommended": "retrieval",
             "reasons": ["retrieval: examples retrieved from the training data are enough"],
             "options": [_option("prompt", 0.31, -0.55), _option("retrieval", 0.84, -0.02), _option("fine_tuned", 0.86, 0.0),
                         _option("embedding", 0.0, 0.0, skipped="sentence-transformers is not installed")]}


def _facts(tmp_path: Path, base: str = "smollm2-135m", fingerprint: str = "sha256:" + "ab" * 32) -> CardFacts:
    suite = make_suite()
    suite.baselines = BASELINES
    tags = {"tuneline.spec_sha256": "5" * 64, "tuneline.dataset_version": "ds-0123456789abcdef",
            "tuneline.base_model": base, "tuneline.base_model_fingerprint": fingerprint,
            "tuneline.adapter_sha256": "7" * 64, **eval_tags(suite, "5" * 64)}
    info = VersionInfo("banking77-intents", 3, "run0123", "file:///store/adapter", "2026-12-01T10:00:00Z", [], tags)
    trail = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}")
    trail.append("data.prepare", subject="dataset:ds-0123456789abcdef", outputs={"dataset": "ds-0123456789abcdef"})
    trail.append("promote", subject="model:other/1")  # about another model: not on the card
    trail.append("register", subject="model:banking77-intents/3", inputs={"run": "run0123"})
    entries = trail.entries(refs=["run0123", "ds-0123456789abcdef", "model:banking77-intents/3"])
    trail.close()
    return CardFacts(
        info=info, spec=parse_spec(SPEC), params={"train.method": "lora", "train.lora.r": "16", "train.lr": "0.0005",
                                                   "device": "cpu", "precision": "bf16"},
        run_metrics={"steps": 120.0, "seconds": 61.5}, suite=suite, audit=entries,
        sources=[DataFile("train", "data/train.csv", "c" * 64, "2855"), DataFile("test", "data/test.csv", "d" * 64, "1000")],
        manifest=None)


def test_card_metadata_validates_and_carries_the_suites_numbers(tmp_path: Path):
    facts = _facts(tmp_path)
    text = render(facts)
    card = ModelCard(text)  # Hugging Face's own parser (offline); raises on malformed metadata
    data = card.data.to_dict()
    assert data["base_model"] == BUILTIN_MODELS["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["library_name"] == "peft" and data["license"] == "apache-2.0"
    assert data["datasets"] == ["ds-0123456789abcdef"] and data["pipeline_tag"] == "text-generation"
    assert {"tuneline", "classification", "lora"} <= set(data["tags"])
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "banking77-intents version 3"
    main = facts.suite.main_set().system("candidate") if facts.suite else None
    assert main is not None and {r.metric_type for r in results} == set(main.metrics)
    for r in results:  # the version's registered metric tags, the candidate's on the main set
        assert r.metric_value == float(facts.info.tags[f"metric.{r.metric_type}"])
        assert r.metric_value == pytest.approx(main.metrics[r.metric_type].value, rel=1e-5)
        assert (r.task_type, r.dataset_type, r.dataset_split) == ("text-classification", "ds-0123456789abcdef", "test")
    # the body: intervals of candidate, base and production; the failed gate; the audit entries
    test = facts.suite.main_set() if facts.suite else None
    assert test is not None
    cells = [r.metrics["accuracy"].fmt() for r in (test.system(x) for x in ("candidate", "base", "production")) if r]
    assert f"| accuracy | {' | '.join(cells)} |" in text and len(cells) == 3
    assert "| `macro_f1 >= 0.90` | 0.85 | 0.9 | FAILED |" in text
    assert facts.audit is not None and [e.action for e in facts.audit] == ["data.prepare", "register"]
    for e in facts.audit:
        assert f"| {e.seq} | {e.at} | {e.actor} | {e.action} | {e.result} | `{e.hash}` |" in text
    assert "other/1" not in text
    # the baseline comparison: each option's metric with its interval, and what it recommends
    assert "| retrieval | the retrieval option | 0.840 [0.810, 0.870] | -0.020 [-0.060, 0.000] |" in text
    assert "| embedding | the embedding option | skipped: sentence-transformers is not installed | " in text
    assert "recommended: **retrieval**" in text


def test_limitations_are_derived_from_facts(tmp_path: Path):
    facts = _facts(tmp_path, base="/data/models/my-llama", fingerprint="dir:" + "e" * 64)
    found = "\n".join(limitations(facts))
    assert "Gates failed: macro_f1 >= 0.90" in found
    assert "typos (+0.070)" in found and "lowercase (+0.010)" in found and "extra whitespace" not in found
    assert "drops by 0.070" in found  # forgetting
    assert "Data licenses not declared (train, test)" in found
    assert "recommends `retrieval` over fine-tuning" in found
    assert "base model's license is not declared" in found
    text = render(facts)
    data = ModelCard(text).data.to_dict()
    # a local base: no hub id to claim, never this machine's path; the license is not invented
    assert "base_model" not in data and "/data/models" not in text
    assert data["license"] == "other" and data["license_name"] == "not-declared"
    assert data["tuneline"]["base_model"] == "my-llama"


@pytest.mark.parametrize(("ref", "kind", "want"), [
    ("smollm2-135m", "builtin", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "hub", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("/home/someone/models/tiny-llama", "local", "tiny-llama"),
    ("~/models/q4.gguf", "gguf", "q4.gguf"),
    ("models/tiny-llama", "local", "models/tiny-llama"),  # relative to the spec: as the spec names it
])
def test_portable_model_name(ref: str, kind, want: str):
    assert portable_model_name(ref, kind) == want


def test_adapter_names_a_builtin_base_by_its_hub_id(tmp_path: Path):
    from peft import LoraConfig, PeftConfig

    from tuneline.pipeline.stages import name_base_portably

    folder = tmp_path / "adapter"
    LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path=str(tmp_path / "models" / "converted")
               ).save_pretrained(str(folder))
    (folder / "README.md").write_text(f"---\nbase_model: {tmp_path}\n---\n")  # PEFT's template
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"weights")
    name_base_portably(folder, ModelSource("builtin", "smollm2-135m", gguf))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert str(tmp_path) not in (folder / "adapter_config.json").read_text()
    assert PeftConfig.from_pretrained(str(folder)).base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    base = json.loads((folder / "base_model.json").read_text())
    assert base["fingerprint"] == ModelSource("builtin", "smollm2-135m", gguf).fingerprint()
    assert not (folder / "README.md").exists()  # the card takes its place after registration


def test_a_declared_data_license_is_on_the_card(tmp_path: Path):
    from tuneline.registry.card import _sources

    declared = SPEC.replace("train: {path: data/train.csv,", "train: {path: data/train.csv, license: CC-BY-4.0,")
    tags = {"tuneline.data.train.sha256": "c" * 64, "tuneline.data.train.path": "data/train.csv",
            "tuneline.data.test.sha256": "d" * 64, "tuneline.data.test.path": "data/test.csv"}
    found = {s.split: s.license for s in _sources(tags, parse_spec(declared), None)}
    assert found == {"train": "CC-BY-4.0", "test": "not declared"}
    facts = _facts(tmp_path)
    facts.sources = _sources(tags, parse_spec(declared), None)
    assert "Data licenses not declared (test)" in render(facts)


@pytest.mark.parametrize(("method", "named", "tags", "library"), [
    ("dora", "A DoRA adapter", {"lora", "dora"}, "peft"),
    ("rslora", "An rsLoRA adapter", {"lora", "rslora"}, "peft"),
    ("ia3", "An IA3 adapter", {"ia3"}, "peft"),
    ("prefix", "A prefix-tuning adapter", {"prefix-tuning"}, "peft"),
    ("prompt", "A prompt-tuning adapter", {"prompt-tuning"}, "peft"),
    ("full", "A fully fine-tuned model", {"full-fine-tuning"}, "transformers"),
])
def test_the_card_names_the_training_method(tmp_path: Path, method: str, named: str, tags: set[str], library: str):
    facts = _facts(tmp_path)
    facts.params["train.method"] = method
    text = render(facts)
    data = ModelCard(text).data.to_dict()
    assert named in text and "LoRA adapter trained" not in text.replace("rsLoRA", "").replace("DoRA", "")
    assert tags <= set(data["tags"]) and (method in ("dora", "rslora")) == ("lora" in data["tags"])
    assert data["library_name"] == library
    kind = "finetune" if method == "full" else "adapter"
    assert f"base_model:{kind}:HuggingFaceTB/SmolLM2-135M-Instruct" in data["tags"]
