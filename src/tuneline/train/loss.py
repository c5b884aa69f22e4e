"""Answer-only causal LM loss.

The vocabulary projection (49k-way for SmolLM2) is computed only at positions whose next token is
an answer token, instead of at every position: prompts are most of each sequence and their loss is
masked anyway. Long answers are projected in chunks of ``LOGITS_CHUNK`` positions, each recomputed in
the backward pass, so a batch of long summaries never holds a [tokens x 49k] logits tensor. The
result equals the standard shifted cross-entropy.

A batch may be padded (``attention_mask``) or packed (``position_ids`` restarting at 0 for every
example and no ``attention_mask``: transformers then builds a block-diagonal causal mask, or uses
the varlen kernels with flash attention, so examples sharing a row never attend to each other).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneline.data.tokenize import IGNORE_INDEX
from tuneline.runtime import cache_argument_of
from tuneline.train.folded_prefix import folded
from tuneline.train.peft_builders import causal_lm_of, is_prompt_learning
from tuneline.train.stem import Decoder, additive_mask, decoder_of, forward_layers

if TYPE_CHECKING:
    import torch

    from tuneline.train.batching import Batch


def _decoder_and_head(model: torch.nn.Module) -> tuple[Decoder, torch.nn.Module]:  # a PeftModel or a PreTrainedModel
    return decoder_of(model), causal_lm_of(model).get_output_embeddings()


# answer positions per vocabulary projection: 2048 x 49,152 fp32 logits is 400 MB
LOGITS_CHUNK = 2048


def answer_loss_sum(model: torch.nn.Module, batch: Batch, chunk: int = LOGITS_CHUNK) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over answer tokens, number of answer tokens)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if is_prompt_learning(model) or _is_sharded_root(model):
        return _forward_loss_sum(model, batch)
    decoder, head = _decoder_and_head(model)
    ids, prefix = batch["input_ids"], int(batch.get("prefix_len", 0))
    fold = batch.get("folded")
    if "stem_states" in batch:  # the frozen layers' output, cached: start at the first trained layer
        hidden = forward_layers(decoder, batch["stem_depth"], None, batch["stem_states"], batch)[1]
    elif fold is not None:  # the prefix packed into a row: one forward (tuneline.train.folded_prefix)
        mask = additive_mask(batch["attention_mask"], next(head.parameters()).dtype)
        with folded(model, *fold):
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state
    elif prefix:
        # the shared prefix once, its keys/values repeated for every row (gradients flow back through
        # the repeat, summed over rows: exactly what computing it per row gives)
        out = decoder(input_ids=ids[:1, :prefix], use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        positions = batch.get("position_ids")  # packed rows: each example's own count from the prefix
        if positions is None:
            positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        mask = batch["attention_mask"]
        if mask.dim() == 4:  # packed rows
            mask = additive_mask(mask, out.last_hidden_state.dtype)
        hidden = decoder(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions,
                         use_cache=True, **{cache_argument_of(type(decoder).forward): cache}).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=batch.get("attention_mask"),
                         position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, prefix + 1 :]
    keep = targets != IGNORE_INDEX
    h, t = hidden[:, :-1][keep], targets[keep]
    n = int(t.shape[0])

    def ce_sum(h_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h_part).float(), t_part, reduction="sum")

    if n <= chunk:
        return ce_sum(h, t), n
    recompute = torch.is_grad_enabled()
    parts = [checkpoint(ce_sum, h[i : i + chunk], t[i : i + chunk], use_reentrant=False) if recompute
             else ce_sum(h[i : i + chunk], t[i : i + chunk]) for i in range(0, n, chunk)]
    return torch.stack(parts).sum(), n


def _is_sharded_root(model: torch.nn.Module) -> bool:
    """A model sharded with FSDP2: its forward gathers the root's weights (embeddings, final norm,
    head) and arranges their gradients' reduction, so the loss must go through it, not around it."""
    import torch

    if not torch.distributed.is_available():  # builds without torch.distributed cannot shard
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _forward_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """The same loss through the model's own forward: for prefix and prompt tuning (the peft
    model's forward adds the virtual tokens) and for a sharded model. Logits are kept only from the
    first answer position of the batch on."""
    import torch.nn.functional as F

    ids, labels = batch["input_ids"], batch["labels"]
    answer_cols = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(answer_cols[0]) if answer_cols.numel() else ids.shape[1] - 1
    keep_n = ids.shape[1] - first  # positions first .. end-1 predict tokens first+1 .. end
    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    # no cache: with one, transformers reads no packed rows from the position ids, and its causal mask
    # would let an example attend to the one before it in the row
    logits = model(input_ids=ids, attention_mask=batch.get("attention_mask"), logits_to_keep=keep_n,
                   use_cache=False, **extra).logits
    logits = logits[:, -keep_n:][:, :-1] if keep_n > 1 else logits[:, :0]
    targets = labels[:, first + 1 :]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n


def standard_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Reference: full logits at every position, then the masked shifted cross-entropy."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n
