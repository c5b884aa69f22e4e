"""The CUDA path: what tuneline computes on an NVIDIA GPU. Skipped without one; ``scripts/gpu-check.sh``
runs these on a GPU machine (with ``--noconftest``: they build their own model and tokenizer, so
they need neither the built-in model nor the servers the rest of the suite starts).

Equalities of the same math computed two ways run in float64, as on the CPU, so only the summation
order (the CUDA kernels') differs; bf16 results are checked against what a wrong computation
would give (attention leaking across packed examples), with tolerances derived from bf16's unit
roundoff and the reduction length (``helpers.tolerance``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_packed_examples_stay_apart,
    float64_model_tolerance,
    lora_model,
    loss_tolerance,
)

from tuneline.data.tokenize import IGNORE_INDEX, Encoded
from tuneline.spec.models import TrainSpec
from tuneline.train import TrainOptions, fast_lora, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"
VOCAB = 512


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t0")))
    tok.pad_token, tok.eos_token = "t0", "t1"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    out = tmp_path_factory.mktemp("gpu-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _examples(seed: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, k) in enumerate([(20, 4), (9, 2), (31, 7), (14, 1), (25, 5), (6, 3)]):
        ids = torch.randint(10, VOCAB, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE_INDEX] * (n - k) + ids[n - k:], f"row{i + 1}"))
    return out


def _grads(model, ids: torch.Tensor):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_equals_peft_on_cuda(gpu_model_dir: Path) -> None:
    """The fused LoRA path (one product for q/k/v's adapters, the scaling folded in) computes peft's
    forward and backward on the GPU's kernels too."""
    model = lora_model(gpu_model_dir, dtype=torch.float64).to(CUDA)
    ids = torch.randint(10, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1)).to(CUDA)
    assert fast_lora.uninstall(model) == 14
    ref_loss, ref = _grads(model, ids)
    assert fast_lora.install(model) == 14
    loss, got = _grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, **loss_tolerance(ref_loss, 3 * 16, VOCAB, mean=True))
    assert got.keys() == ref.keys() and len(ref) == 28
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], **float64_model_tolerance(model, float(ref[n].abs().max())),
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_packed_examples_do_not_see_each_other_under_cuda_sdpa(gpu_model_dir: Path, dtype) -> None:
    """Packed rows (position ids restarting per example, no attention mask) through PyTorch's SDPA on
    the GPU: each example's loss equals its loss alone, and the same row under one causal mask (the
    leak this guards against) falls outside the tolerance."""
    model = lora_model(gpu_model_dir, attn="sdpa", dtype=dtype).to(CUDA)
    assert_packed_examples_stay_apart(model, _examples(1), 0, 40, CUDA)


def _copy_rows(n: int, seed: int) -> list[Encoded]:
    """Random prompts with one fixed answer: learnable by a tiny random model's adapters in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(10, VOCAB, (12,), generator=g).tolist()
        answer = [5, 6, 7, 8, 1]
        out.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, f"row{i}"))
    return out


def _train(model_dir: Path, out: Path, method: str, dtype: str, steps: int):
    from transformers import AutoTokenizer

    from tuneline.models import load_model, resolve_model_source
    from tuneline.runtime import Compute

    cfg = TrainSpec(method=method, max_steps=steps, batch_size=16, seq_len=64, lr=1e-2, precision="auto",
                    checkpoint_every=10**6)
    compute = Compute.resolve(cfg.precision, method, CUDA)
    assert (compute.precision, compute.base_dtype) == ("bf16", dtype)
    base = load_model(resolve_model_source(str(model_dir)), out / "models", CUDA, compute.base_dtype)
    losses: list[float] = []
    model, result = train(cfg, base, AutoTokenizer.from_pretrained(model_dir), [], out,
                          TrainOptions(device=CUDA, show_progress=False, encoded_train=(_copy_rows(256, 0), []),
                                       on_step=lambda step, m: losses.append(m["train_loss"])))
    return model, result, losses


def _assert_learned_and_saved_whole(result, losses: list[float], steps: int) -> None:
    from safetensors.torch import load_file

    assert result.device.startswith(CUDA) and result.precision == "bf16" and result.steps == steps
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses  # over half a nat: the adapters learned the fixed answer
    saved = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    b = [t for n, t in saved.items() if "lora_B" in n]
    assert len(b) == 14 and all(float(t.abs().max()) > 0 for t in b)  # every adapter moved and was saved


def test_lora_trains_on_cuda_in_bf16_and_saves_a_complete_adapter(gpu_model_dir: Path, tmp_path: Path) -> None:
    model, result, losses = _train(gpu_model_dir, tmp_path, "lora", "bf16", 40)
    base_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert base_weight.dtype == torch.bfloat16 and base_weight.device.type == CUDA
    _assert_learned_and_saved_whole(result, losses, 40)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_trains_on_a_4bit_base_on_cuda(gpu_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    model, result, losses = _train(gpu_model_dir, tmp_path, "qlora", "nf4-bf16", 40)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(m.weight.quant_type == "nf4" and m.weight.device.type == CUDA for m in quantized)
    _assert_learned_and_saved_whole(result, losses, 40)


def test_doctor_sees_the_gpu_and_picks_bf16_on_it() -> None:
    from tuneline.runtime import Compute
    from tuneline.train.doctor import machine

    m = machine()
    assert m.gpu == torch.cuda.get_device_name() and m.gpu_memory_mib and m.gpu_bf16
    assert Compute.resolve("auto", "lora") == Compute(CUDA, "bf16", "bf16")
    assert Compute.resolve("auto", "qlora") == Compute(CUDA, "bf16", "nf4-bf16")
    assert Compute.resolve("auto", "full") == Compute(CUDA, "bf16", "fp32")  # fp32 master weights
