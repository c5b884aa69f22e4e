"""Shared fixtures: the real tokenizer, a tiny random model built on it, small data files."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import banking_rows, write_csv, write_spec


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole session: the built-in GGUF is converted once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def builtin_dir(model_cache: Path) -> Path:
    """The real built-in model (SmolLM2-135M-Instruct) converted to a local directory."""
    from tuneline.models import ensure_converted, resolve_model_source

    return ensure_converted(resolve_model_source("smollm2-135m"), model_cache)


@pytest.fixture(scope="session")
def tokenizer(builtin_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and the real tokenizer, saved as a local dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def classification_spec(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A valid classification spec on 3 BANKING77 intents with the tiny model."""
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    write_csv(tmp_path / "train.csv", banking_rows(labels, 8))
    write_csv(tmp_path / "test.csv", banking_rows(labels, 4, "test"))
    return write_spec(tmp_path, f"""
        name: tiny-intents
        task:
          type: classification
          instruction: Classify the message.
        objective:
          primary: accuracy
          thresholds: ["accuracy >= 0.5"]
        model: {tiny_model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
        train:
          method: full
          lr: 3.0e-3
          max_steps: 4
          batch_size: 8
          seq_len: 96
          checkpoint_every: 2
          precision: fp32
        eval:
          batch_size: 16
          max_new_tokens: 8
    """)
