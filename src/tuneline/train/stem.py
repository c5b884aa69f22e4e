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

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from tuneline.runtime import autocast_for, cache_argument_of
from tuneline.runtime.progress import progress_bar
from tuneline.train.batching import collate
from tuneline.train.folded_prefix import folded
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

# The layout of a stored stem (StemStore); part of its key.
STORE_FORMAT = 1


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


class StemStore:
    """Frozen-layer states kept on disk between runs (a workspace's ``stems`` folder): a team that
    trains again on the same rows and base model with other hyperparameters skips the pass over the
    frozen layers. A stem is found by :func:`stem_key`, a hash of everything its states are computed
    from (the stem's own weights and buffers, the model's config, every example's tokens, the depth,
    the precision, the padding token, the build's batching and torch's version), and checked again
    on loading against the decoder's own forward pass for one example (:func:`_agrees`), so a
    loaded stem is the one :func:`build_stem` would compute, to rounding. The newest :data:`KEEP`
    stems stay; older ones are removed when a new one is written."""

    KEEP = 2

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"stem-{key}.safetensors"

    def load(self, key: str) -> Stem | None:
        """The stem stored under ``key``; None when there is none or it cannot be read (logged)."""
        from safetensors import SafetensorError, safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}  # the depth, the batches, each example's batch
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
            batch_of = [int(b) for b in json.loads(meta["batch_of"])]
            batches = int(meta["batches"])
            if not all(0 <= b < batches for b in batch_of):
                raise ValueError("an example names a batch the file does not hold")
            stem = Stem(int(meta["depth"]), [tensors[f"prefix.{b}"] for b in range(batches)], batch_of,
                        [tensors[f"own.{i}"] for i in range(len(batch_of))])
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            log.warning("could not read the stored frozen-layer states %s (%s); computing them again", path, e)
            return None
        with contextlib.suppress(OSError):  # the newest used is kept longest (gone meanwhile: no matter)
            os.utime(path)
        return stem

    def save(self, key: str, stem: Stem) -> None:
        """Write ``stem`` under ``key`` (atomically), then remove all but the newest :data:`KEEP`."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"prefix.{b}": t.contiguous() for b, t in enumerate(stem.prefixes)}
        tensors.update({f"own.{i}": t.contiguous() for i, t in enumerate(stem.own)})
        meta = {"depth": str(stem.depth), "batches": str(len(stem.prefixes)), "batch_of": json.dumps(stem.batch_of)}
        tmp = self.path(key).with_suffix(f".tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.path(key))
        except OSError as e:  # a full disk: this run keeps its states in memory all the same
            tmp.unlink(missing_ok=True)
            log.warning("could not store the frozen-layer states in %s (%s)", self.folder, e)
            return
        for old in self.stored()[self.KEEP:]:
            old.unlink(missing_ok=True)
        log.info("stored the frozen-layer states in %s (%.0f MB) for later runs on the same rows and base model",
                 self.path(key), stem.nbytes / 2**20)

    def stored(self) -> list[Path]:
        """The stored stems, newest first (one another process removes meanwhile is left out)."""
        dated = []
        for path in self.folder.glob("stem-*.safetensors"):
            with contextlib.suppress(OSError):
                dated.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(dated, reverse=True)]


def stem_key(model: torch.nn.Module, encoded: Sequence[Encoded], depth: int, pad_id: int, precision: str) -> str:
    """A hash of everything the states of :func:`build_stem` are computed from: the embeddings and the
    first ``depth`` decoder layers (weights and buffers, byte for byte), the rotary embedding's
    buffers, the model's config, every example's tokens in order, the padding token, the precision,
    the build's batch size, this module's format and torch's version."""
    import torch

    decoder = decoder_of(model)
    h = hashlib.blake2b(digest_size=20)
    head = {"format": STORE_FORMAT, "depth": depth, "pad_id": pad_id, "precision": precision,
            "build_batch": BUILD_BATCH, "torch": torch.__version__, "config": decoder.config.to_dict()}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    parts = [("embed", decoder.embed_tokens), ("rotary", decoder.rotary_emb),
             *((f"layer{i}", decoder.layers[i]) for i in range(depth))]
    for prefix, module in parts:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            data = tensor.detach().contiguous().cpu()
            h.update(f"{prefix}.{name}:{data.dtype}:{tuple(data.shape)}".encode())
            h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    for e in encoded:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def estimated_bytes(model: torch.nn.Module, encoded: Sequence[Encoded], precision: str) -> int:
    """What :func:`build_stem` would hold: one hidden vector per token (shared prefixes counted per example,
    an upper bound)."""
    hidden = int(decoder_of(model).config.hidden_size)
    return sum(len(e.input_ids) for e in encoded) * hidden * (2 if precision == "bf16" else 4)


def memory_budget() -> int:
    """:data:`MEMORY_FRACTION` of the machine's physical memory, in bytes."""
    return int(MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def build_stem(model: torch.nn.Module, encoded: Sequence[Encoded], depth: int, pad_id: int, precision: str,
               device: str, show_progress: bool = False, store: StemStore | None = None) -> Stem | None:
    """Compute every example's states at the top of the first ``depth`` decoder layers, without
    gradients, in length-sorted batches of :data:`BUILD_BATCH` whose shared prefix is computed once
    (``show_progress``: a progress bar over the examples), or read them from ``store`` when it holds
    them (and write them there otherwise). None, with a warning, when the shortest example's states
    differ from what the decoder's own forward computes for it (a layout this module runs wrongly,
    such as scaled embeddings): training then computes every layer."""
    import torch

    decoder = decoder_of(model)
    shortest = min(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_for(precision, device):
            key = stem_key(model, encoded, depth, pad_id, precision) if store is not None else ""
            stored = store.load(key) if store is not None else None
            if (stored is not None and len(stored.own) == len(encoded)
                    and _agrees(decoder, stored, encoded[shortest], shortest, device, quiet=True)):
                log.info("read the %d frozen decoder layers' states of %d examples from %s; training starts each "
                         "step at layer %d", depth, len(encoded), cast("StemStore", store).path(key), depth)
                return stored
            stem = _compute(decoder, encoded, depth, pad_id, device, show_progress)
            if not _agrees(decoder, stem, encoded[shortest], shortest, device):
                return None
    finally:
        model.train(was_training)
    if store is not None:
        store.save(key, stem)
    return stem


def _compute(decoder: Decoder, encoded: Sequence[Encoded], depth: int, pad_id: int, device: str,
             show_progress: bool) -> Stem:
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    prefixes: list[torch.Tensor] = []
    batch_of = [0] * len(encoded)
    own: list[torch.Tensor | None] = [None] * len(encoded)
    t0 = time.perf_counter()
    log.info("computing the %d frozen decoder layers once for %d examples", depth, len(encoded))
    progress = progress_bar(enabled=show_progress)
    with progress:
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
    stem = Stem(depth, prefixes, batch_of, cast("list[torch.Tensor]", own))
    log.info("computed the %d frozen decoder layers once for %d examples in %.1fs (%.0f MB); training starts "
             "each step at layer %d", depth, len(encoded), time.perf_counter() - t0, stem.nbytes / 2**20, depth)
    return stem


def _agrees(decoder: Decoder, stem: Stem, example: Encoded, index: int, device: str, quiet: bool = False) -> bool:
    """Whether ``stem``'s states of ``example`` (its example ``index``) match the decoder's own forward
    pass at the input of layer ``stem.depth``: to rounding (relative norm of the difference within
    1e-3 in fp32, 5e-2 in half precision). ``quiet``: a mismatch is logged at INFO, not as a warning
    (stored states that no longer match are computed again)."""
    import torch

    states, depth = stem.states(index), stem.depth
    want = decoder(input_ids=torch.tensor([example.input_ids], device=device),
                   output_hidden_states=True).hidden_states[depth][0].float().cpu()
    error = float((states.float() - want).norm() / want.norm().clamp_min(1e-12))
    bound = 1e-3 if states.dtype in (torch.float32, torch.float64) else 5e-2
    if error <= bound:
        return True
    if quiet:
        log.info("the stored frozen-layer states differ from the model's own forward pass (relative error %.2g): "
                 "computing them again", error)
        return False
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

    fold = batch.get("folded")
    if fold is not None:  # the prefix is in the rows: one pass (tuneline.train.folded_prefix)
        with folded(decoder, *fold):
            return None, _layers(decoder, start, stop, hidden, additive_mask(batch["attention_mask"], hidden.dtype),
                                 batch["position_ids"], None)
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
