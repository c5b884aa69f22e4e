"""Answer-only causal LM loss.

The vocabulary projection (49k-way for SmolLM2) is computed only at positions whose next token is
an answer token, instead of at every position: prompts are most of each sequence and their loss is
masked anyway. The result equals the standard shifted cross-entropy.
"""

from __future__ import annotations

from typing import Any

from tuneline.data.tokenize import IGNORE_INDEX


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    return decoder, causal_lm.get_output_embeddings()


def answer_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(sum of token cross-entropies over answer tokens, number of answer tokens)."""
    import torch.nn.functional as F

    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()
    n = int(keep.sum())
    return F.cross_entropy(logits, targets[keep], reduction="sum"), n


def standard_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Reference: full logits at every position, then the masked shifted cross-entropy."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n
