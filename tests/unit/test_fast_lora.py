"""The fused LoRA linear computes exactly what peft's LoRA forward computes, gradients included."""

from __future__ import annotations

import pytest
import torch

from tuneline.spec.models import LoraSpec, TrainSpec
from tuneline.train import fast_lora
from tuneline.train.peft_builders import wrap_for_training


def test_lora_linear_gradients_are_exact_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = fast_lora.lora_linear(x, w, b, a, bb, 2.5)
    torch.testing.assert_close(y, x @ w.T + b + 2.5 * (x @ a.T) @ bb.T)
    assert torch.autograd.gradcheck(lambda x, a, bb: fast_lora.lora_linear(x, w, b, a, bb, 2.5), (x, a, bb))


def _model(tiny_model_dir, **lora):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = wrap_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              TrainSpec(lora=LoraSpec(**lora)))
    with torch.no_grad():  # peft starts B at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_model_equals_peft_forward_and_backward(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids = torch.randint(10, 1000, (3, 17), generator=torch.Generator().manual_seed(1))
    assert fast_lora.uninstall(model) == 2 * 7  # every adapted linear of the 2-layer model was fused
    ref_loss, ref = _loss_and_grads(model, ids)
    assert fast_lora.install(model) == 14
    loss, got = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert ref.keys() == got.keys() and len(ref) == 28
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7)


def test_fused_bf16_base_gives_fp32_adapter_grads_close_to_peft(tiny_model_dir):
    from tuneline.train.loop import autocast_for

    model = _model(tiny_model_dir)
    model.get_base_model().to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = torch.randint(10, 1000, (3, 17), generator=torch.Generator().manual_seed(2))
    fast_lora.uninstall(model)
    with autocast_for("bf16", "cpu"):
        ref_loss, ref = _loss_and_grads(model, ids)
    fast_lora.install(model)
    with autocast_for("bf16", "cpu"):
        loss, got = _loss_and_grads(model, ids)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert float(loss) == pytest.approx(float(ref_loss), rel=2e-2)
    for n in ref:  # bf16 rounding differs slightly (scaling folded into B before the cast)
        cos = torch.nn.functional.cosine_similarity(got[n].flatten(), ref[n].flatten(), dim=0)
        assert cos > 0.99, n


def test_cases_the_fused_path_cannot_compute_fall_back_to_peft(tiny_model_dir):
    model = _model(tiny_model_dir, dropout=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fast_lora._fast_path_ok(layer) is None  # dropout: peft's own forward runs
    model = _model(tiny_model_dir)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fast_lora._fast_path_ok(layer) == "default"
    x = torch.randn(2, 3, layer.in_features)
    with model.disable_adapter():  # base model only
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    assert not torch.allclose(layer(x), layer.get_base_layer()(x))
