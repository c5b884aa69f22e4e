"""A prefix every example shares is computed once per batch; loss and gradients stay the same.

The same math computed two ways: the model runs in float64 (only the summation order differs,
whatever kernel the CPU picks); gradients are compared within
:func:`helpers.float64_model_tolerance` (the shared prefix moves the later positions to another
layout, where RoPE's fp32 cos/sin can round an ulp apart), the fp32 loss within
:func:`helpers.loss_tolerance`."""

from __future__ import annotations

import pytest
import torch
from helpers import float64_model_tolerance, lora_model, loss_tolerance

from tuneline.data.tokenize import IGNORE_INDEX, Encoded
from tuneline.train.batching import collate, shared_prefix_len
from tuneline.train.loss import answer_loss_sum

SYSTEM = [1, 9, 400, 401, 402, 403, 404, 405, 2, 1, 10]  # "<start>system ... <end><start>user"


def _examples(seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, k) in enumerate([(12, 3), (7, 2), (20, 6), (9, 1)]):
        body = torch.randint(20, 1000, (n,), generator=g).tolist()
        ids = SYSTEM + body
        out.append(Encoded(ids, [IGNORE_INDEX] * (len(ids) - k) + ids[-k:], f"train.csv:{i + 2}"))
    return out


def test_prefix_is_the_common_prompt_start_and_never_reaches_a_target():
    ex = _examples()
    assert shared_prefix_len(ex) == len(SYSTEM)
    assert shared_prefix_len(ex[:1]) == 0  # one example: nothing to share
    # an example whose answer starts right after the shared tokens: the prefix stops one short of
    # the position that predicts it (the first answer token is predicted from the prefix's end)
    early = Encoded(SYSTEM + [55, 56], [IGNORE_INDEX] * len(SYSTEM) + [55, 56], "x")
    assert shared_prefix_len([*ex, early]) == len(SYSTEM) - 1
    different = Encoded([7, *SYSTEM[1:], 30, 31], [IGNORE_INDEX] * (len(SYSTEM) + 1) + [31], "y")
    assert shared_prefix_len([*ex, different]) == 0  # first token differs


def _model(tiny_model_dir, attn):
    return lora_model(tiny_model_dir, attn, torch.float64)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prefix_loss_and_gradients_equal_the_full_batch(tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn)
    ex = _examples(1)
    results = []
    for share in (False, True):
        model.zero_grad()
        batch = collate(ex, pad_id=2, share_prefix=share)
        loss, n = answer_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (full, n_full, g_full), (shared, n_shared, g_shared) = results
    assert n_full == n_shared == 12
    vocab = model.config.vocab_size
    torch.testing.assert_close(shared, full, **loss_tolerance(full, n_full, vocab))
    assert g_full.keys() == g_shared.keys()
    for k in g_full:  # includes the k/v adapters of the prefix: their gradient sums over every row
        tol = float64_model_tolerance(model, float(g_full[k].abs().max()))
        torch.testing.assert_close(g_shared[k], g_full[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
