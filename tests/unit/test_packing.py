"""Packing several examples into one row changes nothing an example sees: same loss, same gradients.

Each equality is the same math computed two ways, so the model runs in float64, where only the
summation order differs (whatever matmul kernel the CPU picks: AMX, AVX-512, AVX2): gradients
are compared within :func:`helpers.float64_model_tolerance` (float64 over the vocabulary, the
longest reduction, in the output head's backward pass, plus RoPE's fp32 cos/sin); a loss, which
``loss.py`` computes in fp32 from the logits, within :func:`helpers.loss_tolerance`. Each test also checks that a wrong
computation (attention across examples, a dropped answer token) falls outside the tolerance."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_packed_examples_stay_apart,
    float64_model_tolerance,
    lora_model,
    loss_tolerance,
)

from tuneline.data.tokenize import IGNORE_INDEX, Encoded
from tuneline.train.batching import collate, collate_packed, even_rows, pack_rows
from tuneline.train.loss import answer_loss_sum, standard_loss_sum


def _examples(seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, k) in enumerate([(20, 4), (9, 2), (31, 7), (14, 1), (25, 5), (6, 3)]):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE_INDEX] * (n - k) + ids[n - k :], f"train.jsonl:{i + 1}"))
    return out


def test_best_fit_decreasing_packs_every_example_once_within_capacity():
    lengths = [20, 9, 31, 14, 25, 6, 40, 3]
    rows = pack_rows(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert len(rows) == 4 == -(-sum(lengths) // 40)  # 148 tokens: the minimum number of 40-token rows
    assert pack_rows(lengths, 40) == rows
    assert pack_rows([50, 10], 40) == [[0], [1]]  # too long for a row: a row of its own


def test_even_rows_compute_fewer_padded_tokens_than_best_fit_and_keep_every_example():
    # 16 examples' own tokens after a shared prefix of 23, as in a BANKING77 batch (436 in all)
    lengths = [41, 38, 35, 33, 31, 30, 28, 27, 26, 25, 24, 22, 21, 20, 19, 16]
    best_fit = pack_rows(lengths, 96)
    rows = even_rows(lengths, 160, prefix=23)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))

    def computed(rs):  # rows x the widest row: what the products multiply
        return len(rs) * max(sum(lengths[i] for i in r) for r in rs)

    assert computed(best_fit) == 5 * 96
    assert computed(rows) < computed(best_fit)
    assert computed(rows) <= 1.05 * sum(lengths)  # under 5% padding, against 10% for best-fit
    assert even_rows(lengths, 160, prefix=23) == rows  # deterministic
    # never wider than the capacity, unless one example alone is
    assert all(sum(lengths[i] for i in r) <= 60 for r in even_rows(lengths, 60, prefix=23))
    assert even_rows([70, 10], 60, prefix=5) == [[0], [1]]


def test_packed_rows_restart_positions_and_mask_each_examples_first_label():
    ex = _examples()
    batch = collate_packed(ex, pad_id=2, capacity=40)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(ex)
    for row_pos, row_lab in zip(batch["position_ids"], batch["labels"], strict=True):
        starts = (row_pos == 0).nonzero().flatten().tolist()
        assert len(starts) >= 2  # several examples share each row
        for s in starts:
            assert row_lab[s] == IGNORE_INDEX
    # every real token is there exactly once, every answer token is a target exactly once
    assert int((batch["input_ids"] != 2).sum()) == sum(len(e.input_ids) for e in ex)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(e.n_answer_tokens for e in ex)


def _model(tiny_model_dir, attn: str, dtype=torch.float64):
    return lora_model(tiny_model_dir, attn, dtype)


def _grads_close(got: dict, want: dict, model) -> bool:
    """Every float64 gradient tensor within :func:`helpers.float64_model_tolerance`."""
    assert got.keys() == want.keys() and want
    return all(torch.allclose(got[k], want[k], **_grad_tol(want[k], model)) for k in want)


def _grad_tol(ref, model) -> dict[str, float]:
    return float64_model_tolerance(model, float(ref.abs().max()))


def _assert_same_grads(got: dict, want: dict, model) -> None:
    assert got.keys() == want.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], **_grad_tol(want[k], model), msg=lambda m, k=k: f"{k}: {m}")


def _grads(model, batch):
    model.zero_grad()
    loss, n = answer_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir, attn):
    model = _model(tiny_model_dir, attn)
    ex = _examples()
    packed_loss, packed_n, packed = _grads(model, collate_packed(ex, 2, 40))
    padded_loss, padded_n, padded = _grads(model, collate(ex, 2))
    assert packed_n == padded_n == sum(e.n_answer_tokens for e in ex)
    torch.testing.assert_close(packed_loss, padded_loss,
                               **loss_tolerance(padded_loss, padded_n, model.config.vocab_size))
    _assert_same_grads(packed, padded, model)


def test_packed_rows_through_the_models_own_forward_equal_unpacked(tiny_model_dir):
    """The path of a sharded (FSDP) model and of prompt learning: the model's forward, not the
    decoder's. With its default cache on, transformers read no packed rows from the position ids
    and examples attended to the one before them (the loss was off by 4e-5 per token, gradients by
    12% of their largest value, in a sharded full fine-tuning)."""
    from tuneline.train.loss import _forward_loss_sum

    model = _model(tiny_model_dir, "eager")
    ex = _examples()
    model.zero_grad()
    packed_loss, packed_n = _forward_loss_sum(model, collate_packed(ex, 2, 40))
    packed_loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    padded_loss, padded_n, padded = _grads(model, collate(ex, 2))
    assert packed_n == padded_n
    torch.testing.assert_close(packed_loss, padded_loss,
                               **loss_tolerance(padded_loss, padded_n, model.config.vocab_size))
    _assert_same_grads(packed, padded, model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_each_examples_loss_in_a_packed_row_equals_its_loss_alone(tiny_model_dir, dtype):
    """Per example: keep only its labels in the packed batch; the loss must equal running it alone.

    Another example sharing its row (before it) would change it if attention leaked: the same
    packed row with one causal mask over the whole row must fall outside the tolerance. In bf16
    (where masks are easiest to get wrong) the tolerance adds bf16's rounding of the logits."""
    assert_packed_examples_stay_apart(_model(tiny_model_dir, "eager", dtype), _examples(1), 2, 40)


def test_chunked_answer_logits_equal_the_standard_loss_and_gradients(tiny_model_dir):
    model = _model(tiny_model_dir, "eager")
    batch = collate(_examples(2), 2)
    model.zero_grad()
    chunked, n = answer_loss_sum(model, batch, chunk=3)  # 22 answer tokens in 8 chunks
    chunked.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref, n_ref = standard_loss_sum(model, batch)
    ref.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert n == n_ref == 22
    torch.testing.assert_close(chunked, ref, **loss_tolerance(ref, n, model.config.vocab_size))
    _assert_same_grads(got, want, model)
    # a chunking bug that loses one answer token (the last chunk's last) is well outside it
    dropped = {**batch, "labels": batch["labels"].clone()}
    row, at = (int(v) for v in (dropped["labels"] != IGNORE_INDEX).nonzero()[-1])
    dropped["labels"][row, at] = IGNORE_INDEX
    model.zero_grad()
    loss, _ = answer_loss_sum(model, dropped, chunk=3)
    loss.backward()
    assert not _grads_close({k: p.grad for k, p in model.named_parameters() if p.requires_grad}, want, model)


def test_a_packed_optimizer_step_equals_an_unpacked_one(tiny_model_dir):
    from tuneline.train.loop import accumulate_gradients

    model = _model(tiny_model_dir, "eager")
    ex = _examples(3)
    micro = [ex[:3], ex[3:]]  # with gradient accumulation
    results = []
    for capacity in (None, 40):
        model.zero_grad()
        loss, tokens = accumulate_gradients(model, micro, 2, "fp32", "cpu", pack_capacity=capacity)  # no autocast
        results.append((loss, tokens, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (l0, t0, g0), (l1, t1, g1) = results
    assert t0 == t1 == sum(len(e.input_ids) for e in ex)  # real tokens, padding not counted
    # the step's loss: the mean over its 22 answer tokens
    n_answer = sum(e.n_answer_tokens for e in ex)
    torch.testing.assert_close(l1, l0, **loss_tolerance(l0, n_answer, model.config.vocab_size, mean=True))
    _assert_same_grads(g1, g0, model)
