"""Attention over a shared prefix kept once (tuneline.models.prefix_attention) against attention over
the prefix repeated for every row: the same outputs, in float64, for every mask shape it is given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneline.models import prefix_attention


class _Layer(torch.nn.Module):
    def __init__(self, index: int, groups: int) -> None:
        super().__init__()
        self.layer_idx, self.num_key_value_groups = index, groups


def _reference(query, prefix_k, prefix_v, key, value, own_mask):
    """SDPA over the prefix repeated for every row, then the row's own keys (the grouped KV heads
    repeated for the query heads they serve, as transformers does)."""
    rows, heads, queries, _ = query.shape
    groups = heads // key.shape[1]
    k = torch.cat([prefix_k.expand(rows, -1, -1, -1), key], 2).repeat_interleave(groups, 1)
    v = torch.cat([prefix_v.expand(rows, -1, -1, -1), value], 2).repeat_interleave(groups, 1)
    if own_mask is None:  # causal over the own part: the last query is the last own position
        own = key.shape[2]
        own_mask = torch.ones((queries, own), dtype=torch.bool).tril(own - queries)[None, None]
    full = torch.cat([torch.ones((own_mask.shape[0], 1, queries, prefix_k.shape[2]), dtype=torch.bool),
                      own_mask.expand(-1, -1, queries, -1)], -1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=full).transpose(1, 2)


@pytest.mark.parametrize(("queries", "own", "masked"), [
    (7, 7, "padding"),      # a pass over the rows' own tokens, some rows padded on the left of them
    (7, 7, "none"),         # no padding: transformers passes no mask, the attention is causal
    (1, 9, "padding"),      # one decoding step after 8 own tokens
    (1, 9, "none"),
    (5, 5, "broadcast"),    # one mask for every row
])
def test_the_prefix_kept_once_attends_as_the_prefix_repeated(queries, own, masked, monkeypatch):
    torch.manual_seed(0)
    rows, kv_heads, groups, dim, prefix = 5, 2, 3, 8, 11
    query = torch.randn(rows, kv_heads * groups, queries, dim, dtype=torch.float64)
    key, value = (torch.randn(rows, kv_heads, own, dim, dtype=torch.float64) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(1, kv_heads, prefix, dim, dtype=torch.float64) for _ in range(2))
    mask = None
    if masked == "padding":  # row r has r padding columns first; a query never sees a later column
        causal = torch.ones((queries, own), dtype=torch.bool).tril(own - queries)
        mask = torch.stack([causal & (torch.arange(own) >= r) for r in range(rows)])[:, None]
    elif masked == "broadcast":
        mask = torch.ones((queries, own), dtype=torch.bool).tril()[None, None]
    want = _reference(query, prefix_k, prefix_v, key, value, mask)
    layer = _Layer(1, groups)
    for budget in (prefix_attention.SCORES_BYTES, 1):  # all rows at once; one row per chunk
        monkeypatch.setattr(prefix_attention, "SCORES_BYTES", budget)
        token = prefix_attention._PREFIX.set([(None, None), (prefix_k, prefix_v)])
        try:
            got, _ = prefix_attention.prefix_attention_forward(layer, query, key, value, mask)
        finally:
            prefix_attention._PREFIX.reset(token)
        assert got.shape == (rows, queries, kv_heads * groups, dim)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_model_reading_the_prefix_once_gives_each_rows_logits_of_its_whole_prompt(tiny_model_dir):
    """The tiny Llama (grouped KV heads) in float64: rows of different lengths after a shared prefix,
    padded between it and their own tokens, give at their last position the logits the model gives
    each whole prompt alone, through one prefill and one decoding step."""
    from transformers import AutoModelForCausalLM

    from tuneline.eval.generate import prefix_cache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64, attn_implementation="sdpa").eval()
    assert prefix_attention.supports(model)
    prefix = torch.randint(5, 500, (1, 13))
    owns = [torch.randint(5, 500, (n,)) for n in (4, 9, 1, 6)]
    width = max(len(o) for o in owns)
    ids = torch.zeros((len(owns), width), dtype=torch.long)
    mask = torch.zeros((len(owns), width), dtype=torch.long)
    for r, o in enumerate(owns):  # padding between the prefix and the row's own tokens
        ids[r, width - len(o):], mask[r, width - len(o):] = o, 1
    positions = (13 + mask.cumsum(-1) - 1).clamp_min(13)
    nxt = torch.randint(5, 500, (len(owns), 1))
    with torch.no_grad():
        layers = prefix_attention.prefix_layers(prefix_cache(model, prefix, 1))
        with prefix_attention.shared_prefix(model, layers):
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            second = model(input_ids=nxt, attention_mask=mask2, position_ids=positions[:, -1:] + 1, use_cache=True,
                           past_key_values=first.past_key_values)
        assert model.config._attn_implementation == "sdpa"  # restored
        for r, o in enumerate(owns):
            whole = torch.cat([prefix[0], o, nxt[r]])[None]
            logits = model(input_ids=whole).logits[0]
            torch.testing.assert_close(first.logits[r, -1], logits[-2], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(second.logits[r, -1], logits[-1], rtol=1e-10, atol=1e-10)


def test_the_attention_refuses_to_run_without_its_prefix():
    query = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="only inside"):
        prefix_attention.prefix_attention_forward(_Layer(0, 1), query, query, query, None)


def test_a_model_with_a_sliding_window_or_capped_scores_keeps_its_own_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    assert prefix_attention.supports(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert not prefix_attention.supports(windowed)
    query = torch.zeros(1, 2, 1, 4)
    token = prefix_attention._PREFIX.set([(query, query)])
    try:
        with pytest.raises(RuntimeError, match="sliding_window"):
            prefix_attention.prefix_attention_forward(_Layer(0, 1), query, query, query, None, sliding_window=8)
    finally:
        prefix_attention._PREFIX.reset(token)
