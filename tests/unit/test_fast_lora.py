"""The fused LoRA linear computes exactly what peft's LoRA forward computes, gradients included."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_model

from tuneline.spec.models import TrainSpec
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
    return lora_model(tiny_model_dir, **lora)


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


def test_lora_group_gradients_are_exact_in_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ws = [torch.randn(out, 6, dtype=torch.float64, generator=g) for out in (4, 2, 3)]
    as_ = [torch.randn(r, 6, dtype=torch.float64, generator=g, requires_grad=True) for r in (3, 2, 3)]
    bs = [torch.randn(out, r, dtype=torch.float64, generator=g, requires_grad=True) for out, r in ((4, 3), (2, 2), (3, 3))]
    scales = [2.0, 0.5, 1.5]
    outs = fast_lora.lora_group(x, torch.cat(ws), as_, bs, scales)
    for y, w, a, b, s in zip(outs, ws, as_, bs, scales, strict=True):
        torch.testing.assert_close(y, x @ w.T + s * (x @ a.T) @ b.T)
    # one output unused (its gradient None) and the others used: gradients still exact
    assert torch.autograd.gradcheck(
        lambda x, *ab: sum(o.sum() * k for o, k in zip(fast_lora.lora_group(x, torch.cat(ws), list(ab[:3]),
                                                                             list(ab[3:]), scales)[:2], (1.0, 3.0),
                                         strict=True)),
        (x, *as_, *bs))


def test_grouped_linears_share_one_product_and_equal_peft(tiny_model_dir):
    model = _model(tiny_model_dir)
    attn = model.base_model.model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    group = getattr(q, fast_lora._GROUP)
    assert getattr(k, fast_lora._GROUP) is group and group.members == [q, k, v]
    # the base weights are views of one stacked matrix: no copy, and peft still owns them
    stacked = group.weight
    assert q.get_base_layer().weight.data_ptr() == stacked.data_ptr()
    assert v.get_base_layer().weight.data_ptr() == stacked[q.out_features + k.out_features :].data_ptr()

    calls = []
    real = fast_lora.lora_group
    fast_lora.lora_group = lambda *a: calls.append(1) or real(*a)  # type: ignore[assignment]
    try:
        ids = torch.randint(10, 1000, (3, 17), generator=torch.Generator().manual_seed(5))
        loss, got = _loss_and_grads(model, ids)
    finally:
        fast_lora.lora_group = real  # type: ignore[assignment]
    assert len(calls) == 2 * 2  # q/k/v and gate/up in each of the 2 layers, one product each
    fast_lora.uninstall(model)
    ref_loss, ref = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7)


def test_grouped_path_runs_under_inference_mode(tiny_model_dir):
    """Generation with an unmerged adapter: inference tensors have no version counter."""
    model = _model(tiny_model_dir)
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        grouped = model(input_ids=ids).logits
        fast_lora.uninstall(model)
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(grouped, plain, rtol=1e-4, atol=1e-5)


def test_group_restacks_weights_that_were_replaced_and_skips_merged_adapters(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(6))
    ref = model(input_ids=ids).logits.detach()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    q.get_base_layer().weight.data = q.get_base_layer().weight.data.clone()  # e.g. moved or re-loaded
    torch.testing.assert_close(model(input_ids=ids).logits, ref)
    assert q.get_base_layer().weight.data_ptr() == getattr(q, fast_lora._GROUP).weight.data_ptr()  # stacked again
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    tuned = model(input_ids=ids).logits.detach()
    model.merge_adapter()  # merged: the base weights already hold the adapters; no grouped path
    assert getattr(q, fast_lora._GROUP).adapter() is None
    torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneline.data.tokenize import Encoded
    from tuneline.train.loop import accumulate_gradients

    g = torch.Generator().manual_seed(3)
    encs = [Encoded(ids, [-100] * 8 + ids[8:], "x") for ids in
            (torch.randint(10, 1000, (n,), generator=g).tolist() for n in (14, 20, 17))]

    def run(compiled: bool):
        torch.manual_seed(0)
        model = wrap_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainSpec(compile=compiled))
        model.train()
        loss, _ = accumulate_gradients(model, [encs], 2, "fp32", "cpu")
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = run(False)
    compiled_loss, compiled = run(True)
    assert compiled_loss == pytest.approx(plain_loss, rel=1e-5)
    for n in plain:
        torch.testing.assert_close(compiled[n], plain[n], rtol=1e-3, atol=1e-6)
