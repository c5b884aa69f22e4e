"""The real built-in model (SmolLM2-135M-Instruct from its GGUF): loads, answers, trains a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import banking_rows

from tuneline.data.examples import Example
from tuneline.eval import generate
from tuneline.models import load_model, resolve_model_source
from tuneline.runtime import autocast_for, resolve_precision
from tuneline.spec.models import TrainSpec
from tuneline.train import TrainOptions, encode_all, evaluate_loss, train

INSTRUCTION = "Classify the banking customer's message. Answer with the intent label only."


def _examples(labels: list[str], per_label: int, split: str = "train") -> list[Example]:
    return [
        Example(f"{split}.csv:{i}", ({"role": "system", "content": INSTRUCTION}, {"role": "user", "content": r["text"]},
                                     {"role": "assistant", "content": r["category"]}), r["category"], r["category"])
        for i, r in enumerate(banking_rows(labels, per_label, split))
    ]


def test_builtin_model_converts_once_and_answers(builtin_dir: Path, model_cache: Path, tokenizer):
    source = resolve_model_source("smollm2-135m")
    assert source.kind == "builtin"
    model = load_model(source, model_cache)  # loads the cached conversion, no second conversion
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    q = Example("q", ({"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": ""}), "")
    (answer,), _ = generate(model, tokenizer, [q], batch_size=1, max_new_tokens=12, autocast=autocast_for("fp32", "cpu"),
                            show_progress=False)
    assert "Paris" in answer
    # the conversion shared one parsed GGUF reader between its steps; gguf's own names are back
    import gguf
    from gguf.gguf_reader import GGUFReader
    from gguf.tensor_mapping import get_tensor_name_map
    assert gguf.GGUFReader is GGUFReader and gguf.get_tensor_name_map is get_tensor_name_map


def test_builtin_model_trains_a_few_steps(builtin_dir: Path, model_cache: Path, tokenizer, tmp_path: Path):
    examples = _examples(["card_arrival", "exchange_rate"], 8)
    precision = resolve_precision("auto", "cpu")
    model = load_model(resolve_model_source("smollm2-135m"), model_cache, dtype=precision)
    cfg = TrainSpec(max_steps=4, batch_size=8, lr=2e-3, seq_len=128, warmup_ratio=0.0)
    encoded, _ = encode_all(tokenizer, examples, cfg.seq_len)
    before = evaluate_loss(model, encoded, 8, tokenizer.pad_token_id, precision, "cpu")
    trained, result = train(cfg, model, tokenizer, examples, tmp_path, TrainOptions(show_progress=False))
    after = evaluate_loss(trained, encoded, 8, tokenizer.pad_token_id, precision, "cpu")
    assert result.steps == 4 and result.train_tokens > 0
    print(f"answer loss before {before:.3f} after {after:.3f}")
    assert after < before * 0.8, (before, after)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    lora_weights = [p for n, p in trained.named_parameters() if "lora_" in n]
    assert lora_weights and all(p.dtype == torch.float32 for p in lora_weights)


@pytest.mark.slow
def test_builtin_model_learns_intents(builtin_dir: Path, model_cache: Path, tokenizer, tmp_path: Path):
    """About 1.5 minutes: 40 steps on 4 intents lift held-out accuracy from 0 to most rows."""
    from tuneline.eval import classification_metrics

    labels = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
    precision = resolve_precision("auto", "cpu")
    model = load_model(resolve_model_source("smollm2-135m"), model_cache, dtype=precision)
    cfg = TrainSpec(max_steps=40, batch_size=8, lr=1e-3, seq_len=128)
    trained, _ = train(cfg, model, tokenizer, _examples(labels, 40), tmp_path, TrainOptions(show_progress=False))
    test = _examples(labels, 10, "test")
    preds, _ = generate(trained, tokenizer, test, batch_size=20, max_new_tokens=12,
                        autocast=autocast_for(precision, "cpu"), show_progress=False)
    acc = classification_metrics(preds, [e.reference for e in test], labels)["accuracy"]
    assert acc >= 0.7, preds
