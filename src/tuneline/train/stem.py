"""The frozen stem: the decoder layers below the lowest trained one, computed once per example.

With ``train.lora.layers: N`` only the last N decoder layers carry adapters. The embeddings and the
layers below them (the *stem*) hold no trainable weight, and without dropout they are a fixed
function of each example's tokens: a training that passes over its examples more than once
computed them again in every epoch. :func:`build_stem` computes every example's hidden states at the
stem's top once, before the first step; a batch then carries them (``stem_states``, laid out like
its ``input_ids``) and the loss starts its forward pass at the first trained layer
(:func:`forward_layers`). Same loss and gradients, up to float rounding (tested), for the cost of
one pass over the stem instead of one per epoch.

The states are kept on the CPU in the compute dtype; a run whose states would take more than
:data:`MEMORY_FRACTION` of the machine's memory computes the stem in every step as before (logged).
Only decoders that follow the Llama layout (``embed_tokens``, ``layers``, ``rotary_emb``, ``norm``)
with full attention in every layer, eager or SDPA, have a cacheable stem; any other model trains
as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from tuneline.runtime import autocast_for, cache_argument_of
from tuneline.runtime.progress import progress_bar
from tuneline.train.batching import collate
from tuneline.train.peft_builders import causal_lm_of, is_prompt_learning

if TYPE_CHECKING:
    import torch

    from tuneline.data.tokenize import Encoded
    from tuneline.train.batching import Batch

log = logging.getLogger(__name__)

# The cached states may take at most this share of the machine's physical memory.
MEMORY_FRACTION = 0.25

# Examples per batch of the one pass that computes the states (padded, sorted by length).
BUILD_BATCH = 64


class Decoder(Protocol):
    """The parts of a Llama-layout decoder :func:`forward_layers` runs (checked by :func:`stem_depth`)."""

    config: Any
    embed_tokens: torch.nn.Module
    layers: torch.nn.ModuleList
    rotary_emb: torch.nn.Module
    norm: torch.nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def forward(self, *args: Any, **kwargs: Any) -> Any: ...


def decoder_of(model: torch.nn.Module) -> Decoder:
    """The decoder (embeddings, layers, final norm) inside a PeftModel or a transformers causal LM."""
    causal_lm = causal_lm_of(model)
    return cast("Decoder", getattr(causal_lm, causal_lm.base_model_prefix))


def stem_depth(model: torch.nn.Module) -> int:
    """How many leading decoder layers of ``model`` can be cached: those before the first layer with a
    trainable parameter, when the embeddings are frozen, nothing in the stem drops out, and the decoder
    has the layout :func:`forward_layers` runs. 0: no cacheable stem (every layer trains, or another
    layout)."""
    import torch

    if is_prompt_learning(model):
        return 0
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    config = getattr(decoder, "config", None)
    if (not isinstance(layers, torch.nn.ModuleList) or config is None
            or not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm"))):
        return 0
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return 0
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return 0
    if getattr(config, "attention_dropout", 0.0) or any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    depth = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules()):
            return 0
        depth += 1
    return depth if depth < len(layers) else 0


@dataclass
class Stem:
    """Every example's hidden states at the top of the stem (the input of decoder layer ``depth``).

    Examples were computed in batches that share a prefix: ``prefixes[b]`` holds batch ``b``'s
    shared prefix once, ``own[i]`` example ``i``'s states after its batch's prefix."""

    depth: int
    prefixes: list[torch.Tensor]
    batch_of: list[int]
    own: list[torch.Tensor]

    def states(self, index: int) -> torch.Tensor:
        """Example ``index``'s states at every one of its positions: ``[length, hidden]``."""
        import torch

        prefix = self.prefixes[self.batch_of[index]]
        return torch.cat([prefix, self.own[index]]) if prefix.shape[0] else self.own[index]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.prefixes) + sum(t.nbytes for t in self.own)


class StemMemo:
    """Frozen-layer states shared by the trainings of a search: the same rows (one ``encoded_train``
    list) and the same base model. The first training with a given stem depth and precision computes
    them, the later ones reuse them, so a trial pays no pass over the frozen layers at all. Safe
    across threads (a search's parallel trials); a copy sent to another process starts empty."""

    def __init__(self) -> None:
        self._stems: dict[tuple[int, str], Stem] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[StemMemo], tuple[()]]:
        return StemMemo, ()  # pickled (to a Ray worker): an empty memo there

    @property
    def nbytes(self) -> int:
        return sum(stem.nbytes for stem in self._stems.values())

    def get(self, depth: int, precision: str, build: Callable[[], Stem | None]) -> Stem | None:
        """The stem of ``depth`` layers in ``precision``: the one kept, else ``build()`` (kept unless None)."""
        with self._lock:
            stem = self._stems.get((depth, precision))
            if stem is None:
                stem = build()
                if stem is not None:
                    self._stems[(depth, precision)] = stem
            else:
                log.info("reusing the %d frozen decoder layers' states computed for an earlier training", depth)
            return stem


def estimated_bytes(model: torch.nn.Module, encoded: Sequence[Encoded], precision: str) -> int:
    """What :func:`build_stem` would hold: one hidden vector per token (shared prefixes counted per example,
    an upper bound)."""
    hidden = int(decoder_of(model).config.hidden_size)
    return sum(len(e.input_ids) for e in encoded) * hidden * (2 if precision == "bf16" else 4)


def memory_budget() -> int:
    """:data:`MEMORY_FRACTION` of the machine's physical memory, in bytes."""
    return int(MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def build_stem(model: torch.nn.Module, encoded: Sequence[Encoded], depth: int, pad_id: int, precision: str,
               device: str, show_progress: bool = False) -> Stem | None:
    """Compute every example's states at the top of the first ``depth`` decoder layers, without
    gradients, in length-sorted batches of :data:`BUILD_BATCH` whose shared prefix is computed once
    (``show_progress``: a progress bar over the examples). None, with a warning, when the first
    example's states differ from what the decoder's own forward computes for it (a layout this
    module runs wrongly, such as scaled embeddings): training then computes every layer."""
    import torch

    decoder = decoder_of(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    prefixes: list[torch.Tensor] = []
    batch_of = [0] * len(encoded)
    own: list[torch.Tensor | None] = [None] * len(encoded)
    t0 = time.perf_counter()
    log.info("computing the %d frozen decoder layers once for %d examples", depth, len(encoded))
    was_training = model.training
    model.eval()
    progress = progress_bar(enabled=show_progress)
    try:
        with torch.no_grad(), autocast_for(precision, device), progress:
            task = progress.add_task(f"frozen layers 0-{depth - 1}, once", total=len(encoded))
            for start in range(0, len(order), BUILD_BATCH):
                chunk = order[start : start + BUILD_BATCH]
                batch = collate([encoded[i] for i in chunk], pad_id, multiple=1, share_prefix=True)
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}  # type: ignore[assignment]
                embeds = decoder.embed_tokens(batch["input_ids"])
                prefix_out, rows = forward_layers(decoder, 0, depth, embeds, batch)
                p = int(batch.get("prefix_len", 0))
                prefixes.append(prefix_out[0].cpu() if prefix_out is not None else embeds.new_zeros((0, embeds.shape[-1])).cpu())
                for row, i in enumerate(chunk):
                    batch_of[i] = len(prefixes) - 1
                    own[i] = rows[row, : len(encoded[i].input_ids) - p].cpu().clone()
                progress.advance(task, len(chunk))
            if not _agrees(decoder, encoded[order[0]], cast("torch.Tensor", own[order[0]]), prefixes[0], depth, device):
                return None
    finally:
        model.train(was_training)
    stem = Stem(depth, prefixes, batch_of, cast("list[torch.Tensor]", own))
    log.info("computed the %d frozen decoder layers once for %d examples in %.1fs (%.0f MB); training starts "
             "each step at layer %d", depth, len(encoded), time.perf_counter() - t0, stem.nbytes / 2**20, depth)
    return stem


def _agrees(decoder: Decoder, example: Encoded, own: torch.Tensor, prefix: torch.Tensor, depth: int,
            device: str) -> bool:
    """Whether ``example``'s states (``prefix`` then ``own``) match the decoder's own forward pass at
    the input of layer ``depth``: to rounding (relative norm of the difference within 1e-3 in fp32,
    5e-2 in half precision)."""
    import torch

    states = torch.cat([prefix, own]).float()
    want = decoder(input_ids=torch.tensor([example.input_ids], device=device),
                   output_hidden_states=True).hidden_states[depth][0].float().cpu()
    error = float((states - want).norm() / want.norm().clamp_min(1e-12))
    bound = 1e-3 if own.dtype in (torch.float32, torch.float64) else 5e-2
    if error <= bound:
        return True
    log.warning("not caching the %d frozen decoder layers: the states computed for them differ from the model's "
                "own forward pass (relative error %.2g); every step computes every layer", depth, error)
    return False


def forward_layers(decoder: Decoder, start: int, stop: int | None, hidden: torch.Tensor,
                   batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run decoder layers ``start`` to ``stop`` (None: to the last, then the final norm) on ``hidden``,
    the states entering layer ``start`` laid out like ``batch["input_ids"]`` (padded, packed, or packed
    after a shared prefix). The batch's shared prefix is computed once, from row 0, its keys and values
    repeated for every row. Returns (the prefix's output ``[1, prefix, hidden]`` or None, the rows'
    output after the prefix)."""
    import torch
    from transformers.cache_utils import DynamicCache

    prefix = int(batch.get("prefix_len", 0))
    rows = hidden.shape[0]
    cache = prefix_out = None
    if prefix:
        cache = DynamicCache(config=decoder.config)
        positions = torch.arange(prefix, device=hidden.device).unsqueeze(0)
        causal = additive_mask(torch.ones((prefix, prefix), dtype=torch.bool, device=hidden.device).tril()[None, None],
                           hidden.dtype)
        prefix_out = _layers(decoder, start, stop, hidden[:1, :prefix], causal, positions, cache)
        cache.batch_repeat_interleave(rows)
    given = batch.get("position_ids")  # packed rows: each example's own count
    positions = given if given is not None else torch.arange(prefix, hidden.shape[1], device=hidden.device).expand(rows, -1)
    out = _layers(decoder, start, stop, hidden[:, prefix:], additive_mask(dense_mask(batch), hidden.dtype), positions, cache)
    return prefix_out, out


def _layers(decoder: Decoder, start: int, stop: int | None, hidden: torch.Tensor, mask: torch.Tensor,
            positions: torch.Tensor, cache: object | None) -> torch.Tensor:
    layers = decoder.layers[start : stop if stop is not None else decoder.config.num_hidden_layers]
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    extra = {} if cache is None else {cache_argument_of(type(layers[0]).forward): cache, "use_cache": True}
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions, **extra)
    return decoder.norm(hidden) if stop is None else hidden


def dense_mask(batch: Batch) -> torch.Tensor:
    """The batch's attention as a boolean ``[rows, 1, width, prefix + width]`` mask (True: attends),
    ``width`` the columns after the shared prefix: the packed-after-prefix mask as it is; a padded
    batch's causal mask over its real tokens; packed rows' block-diagonal causal mask (an example
    starts where its position ids restart at 0)."""
    import torch

    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        return mask
    ids = batch["input_ids"]
    prefix = int(batch.get("prefix_len", 0))
    width = ids.shape[1] - prefix
    causal = torch.ones((width, prefix + width), dtype=torch.bool, device=ids.device).tril(diagonal=prefix)
    if mask is not None:  # padded: no real token attends to padding
        return causal[None, None] & mask.bool()[:, None, None, :]
    example = (batch["position_ids"] == 0).cumsum(dim=1)  # packed rows, no prefix
    return causal[None, None] & (example[:, None, :, None] == example[:, None, None, :])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive one eager attention adds to its scores (SDPA takes it too)."""
    import torch

    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
