"""The fused LoRA linear computes exactly what peft's LoRA forward computes, gradients included.

Equalities of the same math computed two ways run the model in float64, so only the summation
order differs (whatever kernel the CPU picks), and compare gradients and logits within
:func:`helpers.float64_model_tolerance`; transformers computes the loss in fp32 from the logits,
so a loss gets :func:`helpers.loss_tolerance`."""

from __future__ import annotations

import pytest
import torch
from helpers import float64_model_tolerance, lora_model, loss_tolerance, tolerance

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


def _model(tiny_model_dir, dtype=torch.float64, **lora):
    return lora_model(tiny_model_dir, dtype=dtype, **lora)


def _assert_same_loss_and_grads(loss, grads: dict, ref_loss, ref: dict, model, n_tokens: int) -> None:
    vocab = model.config.vocab_size
    torch.testing.assert_close(loss, ref_loss, **loss_tolerance(ref_loss, n_tokens, vocab, mean=True))
    assert ref.keys() == grads.keys() and ref
    for n in ref:
        tol = float64_model_tolerance(model, float(ref[n].abs().max()))
        torch.testing.assert_close(grads[n], ref[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


def _assert_same_logits(logits, ref, model) -> None:
    tol = float64_model_tolerance(model, float(ref.abs().max()))
    torch.testing.assert_close(logits, ref, **tol)


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
    assert len(ref) == 28
    _assert_same_loss_and_grads(loss, got, ref_loss, ref, model, n_tokens=3 * 16)


def test_fused_bf16_base_gives_fp32_adapter_grads_close_to_peft(tiny_model_dir):
    """Not the same roundings: the fused path folds the scaling into B before the bf16 cast. Each
    gradient is a sum over the hidden size of products of bf16-rounded values, so the two differ by
    about sqrt(hidden)*u_bf16 of the gradient's norm (normwise: the error is relative to the whole
    tensor, not to each element); a wrong adapter scaling must land outside that."""
    from tuneline.runtime import autocast_for

    model = _model(tiny_model_dir, torch.float32)
    model.get_base_model().to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = torch.randint(10, 1000, (3, 17), generator=torch.Generator().manual_seed(2))
    fast_lora.uninstall(model)
    with autocast_for("bf16", "cpu"):
        ref_loss, ref = _loss_and_grads(model, ids)
        max_logit = float(model(input_ids=ids).logits.detach().abs().max())
        adapted = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
        for m in adapted:  # the bug to catch: adapters scaled by 1.5 * alpha/r
            m.scaling["default"] *= 1.5
        _, wrong = _loss_and_grads(model, ids)
        for m in adapted:
            m.scaling["default"] /= 1.5
    fast_lora.install(model)
    with autocast_for("bf16", "cpu"):
        loss, got = _loss_and_grads(model, ids)
    assert all(g.dtype == torch.float32 for g in got.values())
    vocab = model.config.vocab_size
    torch.testing.assert_close(loss, ref_loss, **loss_tolerance(ref_loss, 3 * 16, vocab, torch.bfloat16, max_logit,
                                                                mean=True))
    bound = tolerance(torch.bfloat16, model.config.hidden_size)["atol"]  # relative to the norm

    def normwise(a, b):
        return float((a - b).norm() / b.norm())

    for n in ref:
        assert normwise(got[n], ref[n]) <= bound, (n, normwise(got[n], ref[n]), bound)
    assert sum(normwise(got[n], wrong[n]) > bound for n in ref) >= len(ref) // 2


def test_cases_the_fused_path_cannot_compute_fall_back_to_peft(tiny_model_dir):
    model = _model(tiny_model_dir, torch.float32, dropout=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fast_lora._fast_path_ok(layer) is None  # dropout: peft's own forward runs
    model = _model(tiny_model_dir, torch.float32)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fast_lora._fast_path_ok(layer) == "default"
    x = torch.randn(2, 3, layer.in_features)
    with model.disable_adapter():  # base model only: the very same call, so the very same numbers
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x), rtol=0, atol=0)
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
    _assert_same_loss_and_grads(loss, got, ref_loss, ref, model, n_tokens=3 * 16)


def test_grouped_path_runs_under_inference_mode(tiny_model_dir):
    """Generation with an unmerged adapter: inference tensors have no version counter."""
    model = _model(tiny_model_dir)
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        grouped = model(input_ids=ids).logits
        fast_lora.uninstall(model)
        plain = model(input_ids=ids).logits
    _assert_same_logits(grouped, plain, model)


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
    _assert_same_logits(model(input_ids=ids).logits, tuned, model)  # W + s*B@A: another order, same math
    model.unmerge_adapter()
    _assert_same_logits(model(input_ids=ids).logits, tuned, model)


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
