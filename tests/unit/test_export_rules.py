"""The export rules that need no model: vLLM's verdict on adapter folders, the methods each
format takes, the rotary row order, and the CLI's choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke_cli

from tuneline.export import ExportError
from tuneline.export.gguf_common import interleave_rotary
from tuneline.export.gguf_files import _lora_scaling
from tuneline.export.source import Fetched, method_of, require_mergeable
from tuneline.export.vllm import adapted_modules, check_vllm, render
from tuneline.registry import VersionInfo


def _adapter(folder: Path, modules: tuple[str, ...] = ("q_proj", "v_proj"), **config) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    r = int(config.get("r", 8))
    weights = {}
    for module in modules:
        stem = f"base_model.model.model.layers.0.self_attn.{module}"
        weights[f"{stem}.lora_A.weight"] = np.zeros((r, 4), np.float32)
        weights[f"{stem}.lora_B.weight"] = np.zeros((4, r), np.float32)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    saved = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "bias": "none", "modules_to_save": None, **config}
    (folder / "adapter_config.json").write_text(json.dumps(saved))
    return folder


def _fetched(folder: Path) -> Fetched:
    return Fetched(VersionInfo("m", 3, None, "", ""), folder, method_of(folder))


def test_vllm_loads_a_plain_rank_8_lora_and_says_so(tmp_path: Path):
    folder = _adapter(tmp_path / "a")
    assert adapted_modules(folder) == {"q_proj", "v_proj"}
    assert check_vllm(folder) == []
    assert render([], 16) == ["vLLM: loads as is (--enable-lora, --max-lora-rank 16)"]


def test_vllm_rank_above_its_limit_names_the_flag_value_or_refuses(tmp_path: Path):
    (needs,) = check_vllm(_adapter(tmp_path / "r64", r=64))
    assert not needs.refused and needs.fix == "start vLLM with --max-lora-rank 64"
    (over,) = check_vllm(_adapter(tmp_path / "r300", r=300))
    assert over.fix == "start vLLM with --max-lora-rank 320"  # the next value vLLM accepts
    assert check_vllm(_adapter(tmp_path / "r64b", r=64), max_lora_rank=64) == []
    (refused,) = check_vllm(_adapter(tmp_path / "r1024", r=1024))
    assert refused.refused and "above the largest --max-lora-rank vLLM accepts (512)" in refused.what


def test_vllm_refuses_modules_to_save_dora_bias_embeddings_and_unknown_modules(tmp_path: Path):
    folder = _adapter(tmp_path / "bad", modules=("q_proj", "lm_head", "score"), use_dora=True, bias="all",
                      modules_to_save=["classifier"])
    found = check_vllm(folder)
    text = " | ".join(f"{f.what}; {f.fix}" for f in found)
    assert all(f.refused for f in found) and len(found) == 5, text
    for piece in ("DoRA adapters are not supported", "modules_to_save ['classifier']", "bias 'all'",
                  "LoRA on lm_head", "target modules score are not among"):
        assert piece in text


@pytest.mark.parametrize(("peft_type", "method"), [("IA3", "ia3"), ("PREFIX_TUNING", "prefix"),
                                                   ("PROMPT_TUNING", "prompt")])
def test_vllm_serves_lora_only(tmp_path: Path, peft_type: str, method: str):
    folder = tmp_path / method
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (finding,) = check_vllm(folder)
    assert finding.refused and f"this is {method}" in finding.what and "--format merged" in finding.fix


def test_methods_read_from_the_folder_and_what_each_format_takes(tmp_path: Path):
    assert method_of(_adapter(tmp_path / "r", use_rslora=True)) == "rslora"
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert method_of(full) == "full"
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(ExportError, match=r"prompt tuning: its virtual tokens cannot be merged.*--format merged does "
                                          r"not apply \(export it with --format peft"):
        require_mergeable(_fetched(prompt), "merged")
    with pytest.raises(ExportError, match=r"is a dora model: only LoRA and rsLoRA adapters export as a LoRA GGUF.*"
                                          r"--format gguf \(merged\)"):
        _lora_scaling(_fetched(_adapter(tmp_path / "d", use_dora=True)))
    with pytest.raises(ExportError, match="modules_to_save"):
        _lora_scaling(_fetched(_adapter(tmp_path / "m", modules_to_save=["lm_head"])))
    assert _lora_scaling(_fetched(_adapter(tmp_path / "rs", use_rslora=True, r=16))) == (16, 64.0)  # 16 * sqrt(16)


def test_rotary_rows_are_interleaved_per_head():
    """Per head of 4 rows (2 rotary pairs), HF's halves [a0 a1 | b0 b1] become llama.cpp's pairs [a0 b0 a1 b1]."""
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert interleave_rotary(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_cli_refuses_an_unknown_format(tmp_path: Path):
    result = invoke_cli("export", "m", "--format", "onnx", "-w", str(tmp_path))
    assert result.exit_code == 1 and "--format 'onnx' is not one of peft, merged, gguf, mlflow" in str(result.exception)


def test_the_server_neither_lists_nor_loads_an_mlflow_export():
    """An MLflow export is a registered model too (NAME-mlflow): `tuneline serve` leaves it to MLflow."""
    from tuneline.registry import EXPORT_SOURCE_TAG
    from tuneline.serve.config import ServerConfig
    from tuneline.serve.errors import ApiError
    from tuneline.serve.resolver import ModelResolver

    adapter = VersionInfo("intents", 3, "run", "runs:/x/adapter", "2026-11-30", ["production"])
    export = VersionInfo("intents-mlflow", 1, "run2", "runs:/y/model", "2026-11-30", ["production"],
                         {EXPORT_SOURCE_TAG: "intents/3"})
    config = ServerConfig("sqlite:///unused.db", None, list_versions=lambda: [adapter, export],
                          resolve=lambda ref: export)

    class NoCache:  # the engine's resolve cache, bypassed: nothing is loaded before the refusal
        def cached_resolve(self, ref: str, resolve):
            return resolve(ref)

    resolver = ModelResolver(engine=NoCache(), config=config)  # type: ignore[arg-type]
    assert [v.name for v in resolver.list_versions()] == ["intents"]
    with pytest.raises(ApiError) as info:
        resolver.resolve("intents-mlflow")
    assert info.value.status == 404 and "ask for intents@3" in str(info.value.message)


def test_a_classifier_head_is_refused_by_the_formats_that_generate(tmp_path: Path):
    head = _adapter(tmp_path / "head", task_type="SEQ_CLS", modules_to_save=["score"])
    for fmt in ("merged", "gguf", "mlflow"):
        with pytest.raises(ExportError, match=rf"m@3 is a classifier head.*--format {fmt} writes a model that "
                                              r"generates text.*--format peft"):
            require_mergeable(_fetched(head), fmt)
    require_mergeable(_fetched(_adapter(tmp_path / "gen", task_type="CAUSAL_LM")), "merged")  # a generative LoRA is not


def test_generative_versions_are_mlflow_pyfunc_models_and_the_others_are_not(tmp_path: Path):
    from mlflow.models import Model

    from tuneline.export.version_model import ENV_FILE, MLMODEL, REQUIREMENTS_FILE, write_mlmodel

    lora = _adapter(tmp_path / "lora", task_type="CAUSAL_LM")
    assert write_mlmodel(lora)
    conf = Model.load(str(lora)).flavors["python_function"]
    assert conf["loader_module"] == "tuneline.export.version_model" and conf["env"] == {"virtualenv": ENV_FILE}
    pins = (lora / REQUIREMENTS_FILE).read_text().splitlines()
    assert any(p.startswith("tuneline==") for p in pins) and any(p.startswith("peft==") for p in pins)
    first = {f: (lora / f).read_bytes() for f in (MLMODEL, ENV_FILE, REQUIREMENTS_FILE)}
    assert write_mlmodel(lora)  # deterministic: the same training gives the same registered hash
    assert {f: (lora / f).read_bytes() for f in first} == first
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    head = _adapter(tmp_path / "head", task_type="SEQ_CLS")
    hybrid = _adapter(tmp_path / "hybrid", task_type="CAUSAL_LM")
    (hybrid / "retrieval").mkdir()  # answers with retrieved examples: the pyfunc would answer without them
    for folder in (prompt, head, hybrid):
        assert not write_mlmodel(folder)
        assert not (folder / MLMODEL).exists()


@pytest.mark.parametrize(("request_", "message"), [
    ("hello", "expected a chat request"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\] must be \{'role': one of system, user"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "'max_tokens' must be a positive integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "'stop' must be a string or a list"),
    ([{"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "x"}], "request 1: 'messages' must be"),
])
def test_a_malformed_chat_request_is_refused_with_what_to_send(request_: object, message: str):
    from mlflow.exceptions import MlflowException

    from tuneline.export.version_model import VersionChatModel

    model = VersionChatModel(None, None, "m@1")  # type: ignore[arg-type]  # refused before any model is used
    with pytest.raises(MlflowException, match=message) as caught:
        model.predict(request_)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server answers 400


def test_check_vllm_exits_3_for_an_adapter_vllm_refuses_and_0_for_one_it_loads(tmp_path: Path):
    """`tuneline export NAME --check vllm` on registered versions: CI can gate a deployment on its exit code."""
    import mlflow

    from tuneline import registry
    from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256
    from tuneline.tracking import experiment_folder
    from tuneline.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws")
    mlflow.set_tracking_uri(ws.tracking_uri)
    exp = mlflow.create_experiment("vllm", artifact_location=experiment_folder(ws, "vllm").as_uri())
    for name, folder in (("plain", _adapter(tmp_path / "plain", r=8)), ("dora", _adapter(tmp_path / "d", use_dora=True))):
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(folder), "adapter")
            source = mlflow.get_artifact_uri("adapter")
        registry.register_version(ws.tracking_uri, name, run.info.run_id, source, {ADAPTER_SHA_TAG: tree_sha256(folder)})
    loads = invoke_cli("export", "plain@1", "--check", "vllm", "-w", str(ws.root), "--json")
    assert loads.exit_code == 0, loads.output
    assert json.loads(loads.stdout)["loads"] is True
    refused = invoke_cli("export", "dora@1", "--check", "vllm", "-w", str(ws.root), "--json")
    assert refused.exit_code == 3, refused.output
    verdict = json.loads(refused.stdout)
    assert verdict["loads"] is False and any(f["refused"] and "DoRA" in f["what"] for f in verdict["findings"]), verdict
    assert "vLLM would refuse dora@1" in refused.stderr
