"""Attention over a prefix every row shares, without a copy of it per row.

Classification prompts often start with hundreds of tokens every row shares: the label list
(593 tokens for BANKING77's 77 labels), few-shot demonstrations, a long system prompt. Their keys
and values are computed once per batch, but repeating them for every row of the batch (what a
transformers KV cache holds) copies them ``rows`` times, the cache's concatenation copies them
again at every decoding step, and SDPA on a grouped-query model repeats each key/value head for
every query head it serves: measured on the 593-token label-list prompt, 55% of the time went to
those copies and to attention over them (``bench/prefix_attention.py``).

Here the cache holds only each row's own tokens, and the attention function reads the prefix's
keys and values, kept once (``[1, kv_heads, prefix, head_dim]``), from :func:`shared_prefix`'s
context. Attention splits into the two parts and recombines them exactly (softmax over the union
of the prefix's and the row's own keys):

* the prefix part is one product per key/value head for every row's queries at once
  (``[rows x group x queries, head_dim] x [head_dim, prefix]``), no copy of the prefix;
* the own part is the usual batched product over each row's own keys, under its mask (causal,
  padding);
* both are exponentiated against their common maximum and summed, as one softmax over the
  concatenation would.

Same result as attention over the repeated cache, up to float summation order (tested against
SDPA in float64). Rows are processed in chunks so that the scores stay within :data:`SCORES_BYTES`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

NAME = "tuneline_shared_prefix"

# at most this many bytes of attention scores per chunk of rows
SCORES_BYTES = 256 * 2**20

_PREFIX: contextvars.ContextVar[Sequence[tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "tuneline_shared_prefix", default=None)


def prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls (``AttentionInterface``): ``query`` ``[rows, heads,
    queries, dim]``, ``key``/``value`` the rows' own ``[rows, kv_heads, own, dim]``, ``attention_mask``
    the own part's boolean mask ``[rows, 1, queries, own]`` (True: attends) or None (causal), the
    shared prefix's keys and values those of :func:`shared_prefix` for ``module.layer_idx``. Returns
    ``[rows, queries, heads, dim]``."""
    import torch

    layers = _PREFIX.get()
    if layers is None:
        raise RuntimeError(f"the {NAME} attention runs only inside tuneline.models.prefix_attention.shared_prefix")
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # supports() keeps such models out; never attend without what the model asks for
        raise RuntimeError(f"the {NAME} attention does not apply {', '.join(unsupported)}")
    prefix_k, prefix_v = layers[int(cast("int", module.layer_idx))]
    rows, heads, queries, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    group = heads // kv_heads
    width = prefix_k.shape[2] + own
    per_row = heads * queries * width * torch.finfo(torch.promote_types(query.dtype, torch.float32)).bits // 8
    step = max(1, SCORES_BYTES // max(1, per_row))
    with torch.autocast(query.device.type, enabled=False):  # scores and softmax in float32 at least, as SDPA's
        out = [_attend(query[r:r + step], key[r:r + step], value[r:r + step], _rows(attention_mask, r, step),
                       prefix_k[0], prefix_v[0], group, scaling if scaling is not None else dim ** -0.5)
               for r in range(0, rows, step)]
    return (out[0] if len(out) == 1 else torch.cat(out)), None


def _rows(mask: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """Rows ``start`` to ``start + count`` of a mask (one that broadcasts over the rows as it is)."""
    return mask if mask is None or mask.shape[0] == 1 else mask[start:start + count]


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            prefix_k: torch.Tensor, prefix_v: torch.Tensor, group: int, scaling: float) -> torch.Tensor:
    import torch

    rows, heads, queries, dim = query.shape
    kv_heads, own, prefix = key.shape[1], key.shape[2], prefix_k.shape[1]
    work = torch.promote_types(query.dtype, torch.float32)
    key, value, prefix_k, prefix_v = (t.to(work) for t in (key, value, prefix_k, prefix_v))
    q = query.to(work).reshape(rows, kv_heads, group * queries, dim)  # the query heads one KV head serves, together
    # the prefix: every row's queries of a KV head against its keys, one product per KV head
    by_head = q.transpose(0, 1).reshape(kv_heads, rows * group * queries, dim)
    s_prefix = torch.matmul(by_head, prefix_k.transpose(1, 2)).mul_(scaling)  # [kv, rows*g*q, prefix]
    s_own = torch.matmul(q, key.transpose(2, 3)).mul_(scaling)  # [rows, kv, g*q, own]
    s_own = s_own.view(rows, kv_heads, group, queries, own)
    if mask is None:  # causal: the last query is the last own position
        mask = torch.ones((queries, own), dtype=torch.bool, device=query.device).tril(own - queries)[None, None]
    s_own.masked_fill_(~mask.bool()[:, :, None], float("-inf"))
    s_own = s_own.view(rows, kv_heads, group * queries, own)
    s_prefix = s_prefix.view(kv_heads, rows, group * queries, prefix).transpose(0, 1)  # [rows, kv, g*q, prefix]
    top = torch.maximum(s_prefix.amax(-1), s_own.amax(-1)).unsqueeze(-1)  # the prefix is always visible: finite
    e_prefix, e_own = (s_prefix - top).exp_(), (s_own - top).exp_()
    total = e_prefix.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
    p_by_head = e_prefix.transpose(0, 1).reshape(kv_heads, rows * group * queries, prefix)
    o_prefix = torch.matmul(p_by_head, prefix_v).view(kv_heads, rows, group * queries, dim).transpose(0, 1)
    out = (o_prefix + torch.matmul(e_own, value)).div_(total)  # [rows, kv, g*q, dim]
    return out.reshape(rows, heads, queries, dim).transpose(1, 2).to(query.dtype).contiguous()


def _register() -> None:
    from transformers.masking_utils import sdpa_mask

    register_attention(NAME, prefix_attention_forward, sdpa_mask)  # the own part's mask, as SDPA gets it


def register_attention(name: str, forward: Any, mask: Any) -> None:
    """Register ``forward`` (and ``mask``, the mask function transformers pairs with it) under
    ``name`` with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)


@contextlib.contextmanager
def attention_switched(model: Any, name: str, var: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """Within this block ``model`` (a transformers model) attends through the registered ``name``,
    which reads ``value`` from ``var``; its attention implementation and ``var`` are restored on exit."""
    before = model.config._attn_implementation
    token = var.set(value)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        var.reset(token)


def sees_whole_prefix(config: Any) -> bool:
    """Whether every layer of a model with ``config`` attends over all earlier tokens: full attention,
    no sliding window (a window would hide part of a long prefix from later tokens)."""
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", None) is not False)


def prefix_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` of a one-row KV cache (a transformers ``DynamicCache``)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def supports(model: Any) -> bool:
    """Whether ``model`` can attend through :func:`shared_prefix`: a transformers decoder whose
    attention implementation can be switched, every layer full attention with its ``layer_idx``,
    no sliding window and no capped scores."""
    config = getattr(model, "config", None)
    if config is None or getattr(model, "set_attn_implementation", None) is None:
        return False
    if not sees_whole_prefix(config) or getattr(config, "attn_logit_softcapping", None):
        return False  # a window that would also hide part of the prefix, or scores capped
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return bool(attention) and all(isinstance(getattr(m, "layer_idx", None), int) for m in attention)


@contextlib.contextmanager
def shared_prefix(model: Any, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within this block ``model`` attends to ``layers`` (each layer's prefix keys and values, one
    row) before each row's own tokens; its KV cache then holds the rows' own tokens only, and its
    attention mask covers only them. The model's attention implementation is restored on exit.
    The switch is the model's own setting: another thread that runs the same model meanwhile fails
    loudly (the prefix is this context's, :data:`_PREFIX`), so it is not for a model a server shares."""
    _register()
    with attention_switched(model, NAME, _PREFIX, layers):
        yield
