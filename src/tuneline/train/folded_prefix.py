"""Training over a batch's shared prefix inside the batch's own rows ("folded").

A batch whose examples start with the same tokens (the rendered system prompt and instruction: 23
tokens for the demo's) computes them once (``train.share_prefix``). Computed as a pass of their own,
they make products of 23 rows, which run at a third of the FLOP/s of the batch's products of ~500
rows on a CPU, and every layer's per-call work (norms, rotary, the adapters' small products) once
more, forward and backward: 5-8% of a step measured on the demo's batches.

Folded, the prefix is packed like one more example at the start of one row (``prefix_row``,
:func:`~tuneline.train.batching.collate_packed_after_prefix` with ``fold``), and one forward computes
everything. The attention function here then puts that row's first ``prefix`` keys and values before
every row's own (``[rows, kv_heads, prefix + width, dim]``) and hands them to the model's own eager
attention under the batch's mask ``[rows, 1, width, prefix + width]``: every token sees the prefix
and its own example's earlier tokens; the prefix's tokens see the prefix causally and nothing else
(their own columns in ``prefix_row`` are masked, the copy before them stands for them). The
gradients reaching the prefix's keys and values from every row sum back into ``prefix_row``: the
same loss and gradients as the prefix computed apart (tested in float64).

Used for the eager attention only (the CPU's, for rows under
:data:`~tuneline.models.loading.CPU_SDPA_FROM_TOKENS` tokens): the scores are materialised, as eager
attention does anyway.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tuneline.models.prefix_attention import (
    attention_switched,
    register_attention,
    sees_whole_prefix,
)

if TYPE_CHECKING:
    import torch

NAME = "tuneline_folded_prefix"

_FOLD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(NAME, default=None)


def _eager_of(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]] | None:
    """The eager attention function of ``module``'s model (transformers defines one per model)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def folded_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, *args: Any,
                             **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The attention function transformers calls (``AttentionInterface``): the model's own eager
    attention over ``key``/``value`` ``[rows, kv_heads, width, dim]`` with the folded prefix's keys
    and values (:func:`folded`'s) put before each row's, under ``attention_mask`` ``[rows, 1, width,
    prefix + width]`` (additive)."""
    import torch

    fold = _FOLD.get()
    eager = _eager_of(module)
    if fold is None or eager is None:
        raise RuntimeError(f"the {NAME} attention runs only inside tuneline.train.folded_prefix.folded, on a "
                           "transformers model with an eager attention")
    prefix, row = fold
    if attention_mask is None or attention_mask.shape[-1] != prefix + key.shape[2]:
        raise ValueError(f"{NAME}: the mask must cover the {prefix} prefix columns and the rows' {key.shape[2]}, "
                         f"got {None if attention_mask is None else tuple(attention_mask.shape)}")
    rows = key.shape[0]
    keys = torch.cat([key[row : row + 1, :, :prefix].expand(rows, -1, -1, -1), key], dim=2)
    values = torch.cat([value[row : row + 1, :, :prefix].expand(rows, -1, -1, -1), value], dim=2)
    return eager(module, query, keys, values, attention_mask, *args, **kwargs)


def folds(model: Any) -> bool:
    """Whether ``model`` (a transformers model or a peft wrapper around one) can train on folded
    batches: eager attention it can switch away from and back, every layer full attention (a sliding
    window would hide part of the prefix from later tokens) with a model-level eager function."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "eager":
        return False
    if getattr(_switchable(model), "set_attn_implementation", None) is None or not sees_whole_prefix(config):
        return False
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    return bool(attention) and all(_eager_of(m) is not None for m in attention)


def _switchable(model: Any) -> Any:
    """The transformers model inside a peft wrapper (whose attribute lookup forwards to it anyway)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def folded(model: Any, prefix: int, row: int) -> Iterator[None]:
    """Within this block ``model``'s forward attends through :func:`folded_attention_forward`, the
    prefix being the first ``prefix`` tokens of row ``row``; its attention implementation is restored
    on exit. For training on one thread (the switch is the model's own setting)."""
    from transformers.masking_utils import eager_mask

    register_attention(NAME, folded_attention_forward, eager_mask)  # the batch brings its own 4D mask
    with attention_switched(_switchable(model), NAME, _FOLD, (prefix, row)):
        yield
