"""Model sources: alias, GGUF path, local directory, hub id; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.errors import ModelError
from tuneline.models import resolve_model_source


def test_builtin_alias_points_at_the_packaged_gguf():
    src = resolve_model_source("smollm2-135m")
    assert src.kind == "builtin" and src.is_gguf
    assert src.path is not None and src.path.name.endswith(".gguf") and src.path.is_file()


def test_gguf_path_relative_to_spec_dir(tmp_path: Path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    src = resolve_model_source("m.gguf", base_dir=tmp_path)
    assert src.kind == "gguf" and src.path == (tmp_path / "m.gguf").resolve()
    assert src.fingerprint().startswith("sha256:")


def test_local_directory(tiny_model_dir: Path):
    src = resolve_model_source(str(tiny_model_dir))
    assert src.kind == "local"
    assert src.fingerprint() == resolve_model_source(str(tiny_model_dir)).fingerprint()


def test_hub_id():
    src = resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert src.kind == "hub" and src.path is None


@pytest.mark.parametrize(("ref", "message"), [
    ("missing.gguf", "GGUF file 'missing.gguf' not found"),
    ("not a model", "cannot resolve model"),
])
def test_unresolvable_sources(ref: str, message: str, tmp_path: Path):
    with pytest.raises(ModelError, match=message):
        resolve_model_source(ref, base_dir=tmp_path)


def test_directory_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_source("empty", base_dir=tmp_path)


def test_generation_switches_to_sdpa_and_restores_the_training_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneline.models.loading import inference_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    with inference_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "eager"
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    with inference_attention(sdpa):  # a model already on SDPA (GPU) is left alone
        assert sdpa.config._attn_implementation == "sdpa"
