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
from tuneline.train.batching import collate, collate_packed_after_prefix, shared_prefix_len
from tuneline.train.folded_prefix import folds
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


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = answer_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same_loss_and_grads(model, got, want) -> None:
    (got_loss, got_n, got_grads), (want_loss, want_n, want_grads) = got, want
    assert got_n == want_n == 12
    torch.testing.assert_close(got_loss, want_loss, **loss_tolerance(want_loss, want_n, model.config.vocab_size))
    assert got_grads.keys() == want_grads.keys()
    for k in want_grads:  # includes the k/v adapters of the prefix: their gradient sums over every row
        tol = float64_model_tolerance(model, float(want_grads[k].abs().max()))
        torch.testing.assert_close(got_grads[k], want_grads[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prefix_loss_and_gradients_equal_the_full_batch(tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn)
    ex = _examples(1)
    _assert_same_loss_and_grads(model, _loss_and_grads(model, collate(ex, pad_id=2, share_prefix=True)),
                                _loss_and_grads(model, collate(ex, pad_id=2)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_after_a_shared_prefix_equal_the_full_batch(tiny_model_dir, attn):
    """train.packing with share_prefix: the prefix once, every example's own tokens packed into rows."""
    model = _model(tiny_model_dir, attn)
    ex = _examples(1)
    packed = collate_packed_after_prefix(ex, pad_id=2, capacity=25)  # own lengths 12, 7, 20, 9: 3 rows
    assert packed["prefix_len"] == len(SYSTEM) and packed["input_ids"].shape[0] == 3
    # no padding but a row's tail: 48 own tokens in 3 rows of width 20 (20; 12; 9 + 7), where
    # best-fit alone made 3 rows of 21 (20; 12 + 9; 7)
    assert packed["input_ids"].shape[1] == len(SYSTEM) + 20
    _assert_same_loss_and_grads(model, _loss_and_grads(model, packed), _loss_and_grads(model, collate(ex, pad_id=2)))


def test_the_prefix_folded_into_the_rows_gives_the_loss_and_gradients_of_the_full_batch(tiny_model_dir):
    """train.share_prefix with packing and eager attention: the prefix packed into a row, computed in
    the same forward as the rows (tuneline.train.folded_prefix)."""
    model = _model(tiny_model_dir, "eager")
    assert folds(model) and not folds(_model(tiny_model_dir, "sdpa"))
    ex = _examples(1)
    batch = collate_packed_after_prefix(ex, pad_id=2, capacity=25, fold=True)
    prefix, row = batch["folded"]
    assert prefix == len(SYSTEM) and "prefix_len" not in batch
    # the prefix is one more item to pack: 11 + 48 tokens, no prefix columns before the rows
    assert batch["input_ids"][row, :prefix].tolist() == SYSTEM
    assert batch["input_ids"].shape[1] < len(SYSTEM) + 21
    want = _loss_and_grads(model, collate(ex, pad_id=2))
    _assert_same_loss_and_grads(model, _loss_and_grads(model, batch), want)
    assert model.config._attn_implementation == "eager"  # switched back after the forward

    # the prefix's place in its row, left visible, counts its keys twice: another loss
    doubled = batch["attention_mask"].clone()
    doubled[row, 0, prefix:, prefix : 2 * prefix] = True
    with torch.no_grad():
        wrong, n = answer_loss_sum(model, {**batch, "attention_mask": doubled})
    assert not torch.allclose(wrong, want[0], **loss_tolerance(want[0], n, model.config.vocab_size))


def test_packed_examples_after_a_shared_prefix_never_see_each_other(tiny_model_dir):
    """Each example's loss, its labels alone kept in the packed batch, equals its loss alone; with
    one causal mask over each row (attention leaking to the example before) it does not."""
    model = _model(tiny_model_dir, "eager")
    ex = _examples(2)
    vocab, leaks = model.config.vocab_size, 0
    with torch.no_grad():
        for i, e in enumerate(ex):
            only = [e if j == i else Encoded(o.input_ids, [IGNORE_INDEX] * len(o.input_ids), o.where)
                    for j, o in enumerate(ex)]
            batch = collate_packed_after_prefix(only, pad_id=2, capacity=25)
            packed, n = answer_loss_sum(model, batch)
            alone, n_alone = answer_loss_sum(model, collate([e], pad_id=2))
            assert n == n_alone == e.n_answer_tokens
            tol = loss_tolerance(alone, n, vocab)
            torch.testing.assert_close(packed, alone, **tol, msg=lambda m, w=e.where: f"{w}: {m}")
            prefix, mask = batch["prefix_len"], batch["attention_mask"].clone()
            row, first_label = (int(v) for v in (batch["labels"][:, prefix:] != IGNORE_INDEX).nonzero()[0])
            starts = (batch["position_ids"][row] == prefix).nonzero().flatten()  # examples' first tokens
            if int(starts[starts <= first_label].max()) > 0:  # an example precedes it in its row
                width = mask.shape[2]
                mask[:, 0, :, prefix:] = torch.ones((width, width), dtype=torch.bool).tril()
                leaky, _ = answer_loss_sum(model, {**batch, "attention_mask": mask})
                assert not torch.allclose(leaky, alone, **tol), e.where
                leaks += 1
    assert leaks >= 1
