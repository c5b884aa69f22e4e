"""`tuneline doctor`: the parameter counts and weight bytes of its memory estimate equal those of
the model the trainer builds (the estimate builds it on the meta device, without weights), for each
kind of method; the CLI prints the machine and the spec's precision and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import invoke_cli

from tuneline.runtime.compute import Compute
from tuneline.spec.models import TrainSpec
from tuneline.train.doctor import estimate


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt", "full"])
def test_the_estimate_counts_the_parameters_the_trainer_trains(method: str, tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneline.train.peft_builders import wrap_for_training

    train = TrainSpec(method=method, batch_size=4, seq_len=64, prompt={"virtual_tokens": 4})
    compute = Compute("cpu", "fp32", "fp32")
    found = estimate(tiny_model_dir, train, compute)
    model = wrap_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), train)
    params = list(model.parameters())
    assert found.total_params == sum(p.numel() for p in params)
    assert found.trainable_params == sum(p.numel() for p in params if p.requires_grad) > 0
    assert found.weights_bytes == sum(p.numel() * p.element_size() for p in params)
    assert found.optimizer_bytes == 2 * found.gradients_bytes == 8 * found.trainable_params  # AdamW's two fp32 moments


def test_a_bf16_base_halves_the_frozen_weights_only(tiny_model_dir: Path):
    train = TrainSpec(method="lora", batch_size=4, seq_len=64)
    fp32 = estimate(tiny_model_dir, train, Compute("cpu", "fp32", "fp32"))
    bf16 = estimate(tiny_model_dir, train, Compute("cpu", "bf16", "bf16"))
    frozen = fp32.total_params - fp32.trainable_params
    assert bf16.weights_bytes == frozen * 2 + fp32.trainable_params * 4  # adapter weights stay fp32
    assert bf16.activations_bytes * 2 == fp32.activations_bytes
    checkpointed = estimate(tiny_model_dir, train.model_copy(update={"gradient_checkpointing": True}),
                            Compute("cpu", "fp32", "fp32"))
    assert checkpointed.activations_bytes < fp32.activations_bytes


def test_on_a_gpu_sdpa_keeps_no_attention_probabilities(tiny_model_dir: Path):
    """Measured on an H200 (scripts/gpu-check.sh): counting rows x heads x tokens^2 probabilities per
    layer, as the CPU's eager attention keeps, put the 1B estimate at 2-3x the measured peak."""
    from transformers import AutoConfig

    train = TrainSpec(method="lora", batch_size=4, seq_len=64)
    cpu = estimate(tiny_model_dir, train, Compute("cpu", "bf16", "bf16"))
    gpu = estimate(tiny_model_dir, train, Compute("cuda", "bf16", "bf16"))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    assert cpu.activations_bytes - gpu.activations_bytes == layers * 4 * heads * 64 * 63 * 2  # bf16 bytes
    assert gpu.weights_bytes == cpu.weights_bytes


def test_doctor_prints_the_machine_and_what_the_spec_will_use(classification_spec: Path, tmp_path: Path):
    done = invoke_cli("doctor", str(classification_spec), "-w", str(tmp_path / "ws"), "--json")
    assert done.exit_code == 0, done.output
    found = json.loads(done.stdout)
    assert (found["device"], found["precision"], found["precision_why"]) == ("cpu", "fp32", "train.precision: fp32")
    auto = invoke_cli("doctor", str(_with_auto_precision(classification_spec)), "-w", str(tmp_path / "ws"), "--json")
    expected = Compute.resolve("auto", "lora", "cpu")  # bf16 on a CPU with AMX or AVX512-BF16, else fp32
    assert json.loads(auto.stdout)["precision"] == expected.precision
    assert json.loads(auto.stdout)["precision_why"].startswith("auto: the CPU")
    assert found["memory"]["trainable_params"] > 0 and found["memory"]["total_bytes"] > found["memory"]["weights_bytes"]
    machine = invoke_cli("doctor", "-w", str(tmp_path / "ws"))  # no spec: the machine only
    assert machine.exit_code == 0 and "machine:" in machine.output and "cores" in machine.output


def _with_auto_precision(spec: Path) -> Path:
    text = spec.read_text()
    assert "precision: fp32" in text
    out = spec.with_name("auto.yaml")
    out.write_text(text.replace("precision: fp32", "precision: auto"))
    return out


@pytest.mark.parametrize(("seq_len", "attention"), [(96, "eager"), (256, "sdpa")])
def test_long_rows_train_with_sdpa_on_the_cpu_and_doctor_says_so(tiny_model_dir: Path, tmp_path: Path, seq_len: int,
                                                                 attention: str):
    """bench/train_memory.py measured SDPA faster and smaller than the eager attention for rows of
    170 and 350 tokens on this CPU (within 3% at 50): from 256 tokens a row training switches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.data.examples import Example
    from tuneline.train import TrainOptions, train

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    cfg = TrainSpec(method="lora", batch_size=2, seq_len=seq_len, max_steps=1, precision="fp32")
    rows = [Example(f"t:{i}", ({"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"}), "ok")
            for i in range(2)]
    trained, _ = train(cfg, model, AutoTokenizer.from_pretrained(tiny_model_dir), rows, tmp_path,
                       TrainOptions(show_progress=False))
    assert trained.get_base_model().config._attn_implementation == attention
    found = estimate(tiny_model_dir, cfg, Compute("cpu", "fp32", "fp32"))
    gpu = estimate(tiny_model_dir, cfg, Compute("cuda", "fp32", "fp32"))
    assert (found.activations_bytes == gpu.activations_bytes) == (attention == "sdpa")
