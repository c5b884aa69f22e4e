"""Constrained greedy answers over a label set without ``generate``: the label is read off the trie.

Greedy decoding constrained to the label trie picks, at each undecided node, the allowed token of
highest logit, and a label is decided at the first token where the remaining labels differ. Here
one forward pass over the prompts gives every row's first choice; only the rows whose label is
still undecided then take one more token each, level by level, on the same KV cache (rows that are
decided leave the batch and its cache), and the head is computed at the last position only. The
prompts' layout, positions and KV cache are decoding's (:func:`tuneline.eval.generate.generate_detailed`:
the shared prefix once per batch, each row's padding between that prefix and its own tokens), so
the answers are decoding's, token for token (tested in float64). What goes is ``generate``'s
per-step work for rows already decided, its logits processors and stopping criteria in Python,
and its prefill padding: a batch's prompts are split where their lengths differ (``bench/classify_eval.py``).
The shared prefix is computed once per call and, on a decoder that supports it, never copied:
the KV cache holds each row's own tokens and the attention reads the prefix's keys and values
once for all rows (:mod:`tuneline.models.prefix_attention`, ``bench/prefix_attention.py``)."""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from tuneline.data.examples import Example
from tuneline.data.tokenize import encode_prompt
from tuneline.eval.generate import (
    GenerateOptions,
    Generation,
    LabelTrie,
    common_prefix_len,
    end_token_ids,
    generate_cache_argument,
    pad_after_prefix,
    prefix_cache,
    read_answer,
)
from tuneline.models import prefix_attention
from tuneline.models.loading import inference_attention
from tuneline.runtime.progress import progress_bar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# a batch's prompts (sorted by length) are split into forward passes of at least MIN_PASS_ROWS rows
# where padding would add more than MAX_PADDING of the real tokens
MAX_PADDING = 0.1
MIN_PASS_ROWS = 8


def score_labels(model: Any, tokenizer: PreTrainedTokenizerBase, examples: list[Example], options: GenerateOptions,
                 max_new_tokens: int) -> Generation:
    """The constrained greedy answer of each example over ``options.labels``, in input order, with at
    most ``max_new_tokens`` tokens, as :func:`~tuneline.eval.generate.generate_detailed` decodes it."""
    import torch

    trie = options.labels
    assert trie is not None
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    n_prefix = common_prefix_len(prompts) if options.share_prefix else 0
    ends = end_token_ids(tokenizer)
    outputs, stopped, lengths = [""] * len(prompts), [False] * len(prompts), [0] * len(prompts)
    model.eval()
    t0 = time.perf_counter()
    bar = progress_bar(enabled=options.show_progress)
    with bar, torch.inference_mode(), inference_attention(model), options.autocast:
        task = bar.add_task(options.description, total=len(prompts))
        shared: Any = None  # the shared prefix's KV cache, computed once
        if n_prefix:
            shared = prefix_cache(model, torch.tensor([prompts[0][:n_prefix]], device=options.device), 1)
        attend = prefix_attention.supports(model) and shared is not None
        with prefix_attention.shared_prefix(model, prefix_attention.prefix_layers(shared)) if attend else nullcontext():
            for idx in _passes(order, [len(p) - n_prefix for p in prompts], options.batch_size):
                rows = [prompts[i] for i in idx]
                cache: Any = None
                if shared is not None and not attend:  # a copy of the prefix's cache for every row
                    cache = copy.deepcopy(shared)
                    cache.batch_repeat_interleave(len(rows))
                for i, path in zip(idx, _walk(model, tokenizer.pad_token_id, rows, n_prefix, cache, trie,
                                              max_new_tokens, options.device), strict=True):
                    stopped[i], lengths[i], outputs[i] = read_answer(tokenizer, trie.decided(path), ends, ())
                bar.update(task, advance=len(idx))
    return Generation(outputs, (time.perf_counter() - t0) / max(1, len(prompts)), stopped, lengths)


def _passes(order: list[int], own: list[int], batch_size: int) -> list[list[int]]:
    """``order`` (ascending length) cut into passes of at most ``batch_size`` rows, each of at least
    :data:`MIN_PASS_ROWS` ending where the next row would pad it by more than :data:`MAX_PADDING`."""
    out: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        padded = own[i] * (len(current) + 1) > (1 + MAX_PADDING) * (real + own[i])
        if current and (len(current) == batch_size or (len(current) >= MIN_PASS_ROWS and padded)):
            out.append(current)
            current, real = [], 0
        current.append(i)
        real += own[i]
    if current:
        out.append(current)
    return out


def _walk(model: Any, pad: int, rows: list[list[int]], n_prefix: int, cache: Any, trie: LabelTrie,
          max_new_tokens: int, device: str) -> list[list[int]]:
    """Each row's greedy path through the trie: the allowed token of highest logit (the lowest id among
    equals, as decoding's argmax) until one label is left or ``max_new_tokens`` tokens. ``cache``: the
    KV cache of the ``n_prefix`` tokens every row starts with, one copy a row; None without a prefix, or
    when the model reads the prefix through :func:`tuneline.models.prefix_attention.shared_prefix`."""
    import torch

    ids, mask = pad_after_prefix(rows, rows[0][:n_prefix], pad)  # decoding's layout
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache_arg = generate_cache_argument(model)
    kwargs: dict[str, Any] = {cache_arg: cache} if cache is not None else {}
    own = positions[:, n_prefix:]
    if cache is None:  # no prefix, or one the attention reads on its own (prefix_attention): the rows' columns
        mask, positions = mask[:, n_prefix:], own
    out = model(input_ids=ids[:, n_prefix:], attention_mask=mask, position_ids=own, use_cache=True, logits_to_keep=1,
                **kwargs)
    paths: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))  # rows in the batch, in its order
    while True:
        logits = out.logits[:, -1].float()
        for j, r in enumerate(live):
            allowed = trie.allowed(paths[r])
            paths[r].append(allowed[int(torch.argmax(logits[j, allowed]))])
        keep = [j for j, r in enumerate(live) if len(paths[r]) < max_new_tokens and trie.completion(paths[r]) is None]
        if not keep:
            return paths
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        if len(keep) < len(live):
            cache.batch_select_indices(torch.tensor(keep, device=device))
            mask, positions = mask[keep], positions[keep]
        live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        step = torch.tensor([[paths[r][-1]] for r in live], dtype=torch.long, device=device)
        out = model(input_ids=step, attention_mask=mask, position_ids=positions[:, -1:], use_cache=True,
                    logits_to_keep=1, **{cache_arg: cache})
