"""Answer-only logits give the same loss and gradients as the standard full-logits loss.

Each equality is the same math computed two ways: the model runs in float64 so that only the
summation order differs (whatever kernel the CPU picks), gradients are compared within
:func:`helpers.float64_model_tolerance` (float64 over the vocabulary, the head's backward pass, plus
RoPE's fp32 cos/sin), and losses, which ``loss.py`` computes in fp32, within
:func:`helpers.loss_tolerance`."""

from __future__ import annotations

import pytest
import torch
from helpers import float64_adapters, float64_model_tolerance, loss_tolerance

from tuneline.data.tokenize import Encoded
from tuneline.spec.models import TrainSpec
from tuneline.train.batching import collate, epoch_batches
from tuneline.train.loss import answer_loss_sum, standard_loss_sum
from tuneline.train.peft_builders import wrap_for_training


def _batch():
    g = torch.Generator().manual_seed(0)
    encs = []
    for n, k in [(20, 4), (13, 2), (30, 7)]:
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        encs.append(Encoded(ids, [-100] * (n - k) + ids[n - k :], "x"))
    return collate(encs, pad_id=2)


def _model(tiny_model_dir, spec: TrainSpec | None = None):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return float64_adapters(wrap_for_training(base, spec or TrainSpec()))


def _assert_same_grads(got: dict, want: dict, model) -> None:
    assert got.keys() == want.keys() and want
    for k in want:
        tol = float64_model_tolerance(model, float(want[k].abs().max()))
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_answer_only_loss_equals_standard(tiny_model_dir):
    model = _model(tiny_model_dir)
    batch = _batch()
    a, na = answer_loss_sum(model, batch)
    a.backward()
    grads_a = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    s, ns = standard_loss_sum(model, batch)
    s.backward()
    assert na == ns == 4 + 2 + 7  # every answer token is a target, the first predicted from the prompt
    vocab = model.config.vocab_size
    torch.testing.assert_close(a, s, **loss_tolerance(s, ns, vocab))
    _assert_same_grads(grads_a, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model)


def test_epoch_batches_deterministic_and_complete():
    lengths = [5, 50, 7, 33, 21, 9, 40, 3, 11, 27]
    b1 = epoch_batches(lengths, 3, seed=1, epoch=0)
    assert b1 == epoch_batches(lengths, 3, seed=1, epoch=0)
    assert sorted(i for b in b1 for i in b) == list(range(10))
    assert b1 != epoch_batches(lengths, 3, seed=1, epoch=1)


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir):
    """Batch 16 == batch 4 x accumulation 4, with answers of very different lengths."""
    from tuneline.train.loop import accumulate_gradients

    g = torch.Generator().manual_seed(1)
    encs = []
    for i in range(16):
        n, k = 12 + i, 1 + (i % 4) * 5  # answer lengths 1..16 tokens
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        encs.append(Encoded(ids, [-100] * (n - k) + ids[n - k :], f"x:{i}"))
    model = _model(tiny_model_dir)
    n_answer, vocab = sum(e.n_answer_tokens for e in encs), model.config.vocab_size

    def grads(micro):
        model.zero_grad()
        loss, _ = accumulate_gradients(model, micro, 2, "fp32", "cpu")
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    big_loss, big = grads([encs])
    acc_loss, acc = grads([encs[i : i + 4] for i in range(0, 16, 4)])
    tol = loss_tolerance(big_loss, n_answer, vocab, mean=True)
    torch.testing.assert_close(acc_loss, big_loss, **tol)
    _assert_same_grads(acc, big, model)

    # the naive mean of per-micro-batch means differs: the test would catch that bug
    naive = sum(accumulate_gradients(model, [encs[i : i + 4]], 2, "fp32", "cpu")[0] for i in range(0, 16, 4)) / 4
    assert abs(naive - big_loss) > tol["atol"]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    from tuneline.train.loop import accumulate_gradients

    g = torch.Generator().manual_seed(2)
    encs = [Encoded(ids, [-100] * 10 + ids[10:], "x") for ids in
            (torch.randint(10, 1000, (n,), generator=g).tolist() for n in (14, 20, 17))]

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = _model(tiny_model_dir, TrainSpec(gradient_checkpointing=checkpointing))
        model.train()
        loss, _ = accumulate_gradients(model, [encs], 2, "fp32", "cpu")
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model

    plain_loss, plain, _ = grads(False)
    ckpt_loss, ckpt, model = grads(True)
    assert model.get_base_model().is_gradient_checkpointing
    vocab = model.config.vocab_size
    n_answer = sum(e.n_answer_tokens for e in encs)
    torch.testing.assert_close(ckpt_loss, plain_loss, **loss_tolerance(plain_loss, n_answer, vocab, mean=True))
    _assert_same_grads(ckpt, plain, model)


@pytest.mark.parametrize("kind,mid,end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_lr_schedules_warm_up_then_decay(kind, mid, end):
    from tuneline.train.loop import _lr_lambda

    f = _lr_lambda(total=22, warmup=2, kind=kind)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warm-up
    assert f(2) == pytest.approx(1.0)
    assert f(12) == pytest.approx(mid)  # half way through the decay
    assert f(22) == pytest.approx(end)
