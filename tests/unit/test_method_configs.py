"""Each training method's spec checks and the peft configuration built for it (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import spec_error

from tuneline.models.sources import ModelSource
from tuneline.pipeline.stages import name_base_portably
from tuneline.spec import load_spec
from tuneline.spec.methods import TRAIN_METHODS
from tuneline.spec.models import TrainSpec
from tuneline.train.peft_builders import build_peft_config


@pytest.mark.parametrize(("method", "peft_type", "flags"), [
    ("lora", "LORA", {"use_dora": False, "use_rslora": False}),
    ("dpo", "LORA", {"use_dora": False, "use_rslora": False}),  # the LoRA adapter DPO continues
    ("dora", "LORA", {"use_dora": True, "use_rslora": False}),
    ("rslora", "LORA", {"use_dora": False, "use_rslora": True}),
    ("ia3", "IA3", {"target_modules": {"k_proj", "v_proj", "down_proj"}, "feedforward_modules": {"down_proj"}}),
    ("prefix", "PREFIX_TUNING", {"num_virtual_tokens": 20, "prefix_projection": False}),
    ("prompt", "PROMPT_TUNING", {"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"}),
])
def test_each_adapter_method_builds_its_peft_configuration(method: str, peft_type: str, flags: dict[str, object]):
    config = build_peft_config(TrainSpec(method=method))
    assert config.peft_type == peft_type and config.task_type == "CAUSAL_LM"
    for key, want in flags.items():
        got = getattr(config, key)
        assert (set(got) if isinstance(want, set) else got) == want, key


def test_every_method_but_full_has_a_configuration():
    assert set(TRAIN_METHODS) == {"lora", "dora", "rslora", "qlora", "ia3", "prefix", "prompt", "full", "dpo"}
    for method in TRAIN_METHODS:
        if method != "full":
            assert build_peft_config(TrainSpec(method=method)) is not None


def test_prompt_tuning_from_text_reads_the_base_models_tokenizer_folder(tmp_path: Path):
    class Base:  # what build_peft_config reads of a transformers model
        class config:  # noqa: N801
            name_or_path = str(tmp_path)

    config = build_peft_config(TrainSpec(method="prompt", prompt={"init_text": "Classify.", "virtual_tokens": 8}),
                               Base())  # type: ignore[arg-type]
    assert config.prompt_tuning_init == "TEXT" and config.prompt_tuning_init_text == "Classify."
    assert config.tokenizer_name_or_path == str(tmp_path)


def test_packing_is_refused_for_virtual_token_methods(tmp_path: Path):
    message = spec_error(tmp_path, "train: {method: prefix, packing: true}")
    assert "train.packing" in message and "set packing: false" in message
    body = (tmp_path / "tuneline.yaml").read_text().replace("method: prefix", "method: lora")
    (tmp_path / "tuneline.yaml").write_text(body)
    assert load_spec(tmp_path / "tuneline.yaml").spec.train.packing  # LoRA packs as before


def test_ia3_feedforward_modules_must_be_targets(tmp_path: Path):
    message = spec_error(tmp_path, "train: {method: ia3, ia3: {target_modules: [k_proj], feedforward_modules: [down_proj]}}")
    assert "train.ia3.feedforward_modules" in message and "down_proj" in message


def test_an_unknown_method_names_the_choices(tmp_path: Path):
    message = spec_error(tmp_path, "train: {method: qlora2}")
    assert "train.method" in message and "dora" in message and "prompt" in message


def test_the_saved_adapter_names_no_path_of_this_machine(tmp_path: Path):
    """Prompt tuning from init_text records the tokenizer folder it read: replaced by the portable name."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "/root/.cache/x", "tokenizer_name_or_path": "/root/.cache/x", "peft_type": "PROMPT_TUNING"}))
    name_base_portably(folder, ModelSource("hub", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == saved["tokenizer_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"



def test_a_checkpoint_depends_only_on_the_settings_of_its_own_method(tmp_path: Path):
    """Editing train.ia3 does not invalidate a LoRA run's checkpoints; it does an IA3 run's."""
    from tuneline.curation import PreparedData
    from tuneline.pipeline.stages import run_fingerprint

    def fingerprint(train: str) -> str:
        (tmp_path / "tuneline.yaml").write_text(
            "name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
            f"data: {{train: {{path: train.csv}}}}\n{train}\n")
        return run_fingerprint(load_spec(tmp_path / "tuneline.yaml"), PreparedData([], [], [], None), "model")

    lora = fingerprint("train: {method: lora}")
    assert fingerprint("train: {method: lora, ia3: {target_modules: [q_proj], feedforward_modules: []}}") == lora
    ia3 = fingerprint("train: {method: ia3}")
    assert ia3 != lora
    assert fingerprint("train: {method: ia3, ia3: {target_modules: [q_proj], feedforward_modules: []}}") != ia3
    # adapting the last 10 layers trains something else; unset (every layer) is the fingerprint above
    assert fingerprint("train: {method: lora, lora: {layers: 10}}") != lora
