"""Serving a classifier-head version (``task.head: classifier``): a chat request is answered with a
label after one forward pass, nothing generated (``finish_reason: stop``).

The engine's hook is three calls: :func:`is_classifier_version` on a version's adapter folder when it
loads it; :func:`load_classifier_version` (the engine's base model is copied, never changed); and for
each request :func:`classify_prompt` with the request's prompt ids (the chat template rendered with the
generation prompt, as for generation), whose label is the whole answer.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.eval.classify import classify_ids, head_labels
from tuneline.models.loading import inference_attention
from tuneline.train.classifier import is_classifier_folder, load_classifier

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def is_classifier_version(adapter_dir: str | Path) -> bool:
    """Whether the adapter folder of a version holds a classifier head (then it is served per model)."""
    return is_classifier_folder(adapter_dir)


def load_classifier_version(base: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """The classifier of ``adapter_dir`` on a copy of ``base`` (the causal LM the engine serves; its
    decoder is copied, so the base and its other adapters answer as before), LoRA merged, in eval mode."""
    return load_classifier(copy.deepcopy(base), adapter_dir)  # type: ignore[return-value]  # merged: no peft


def classify_prompt(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], *,
                    autocast: AbstractContextManager[object] | None = None) -> str:
    """The label the classifier gives the prompt ``prompt_ids`` (one forward pass)."""
    return classify_prompts(model, tokenizer, [prompt_ids], autocast=autocast)[0]


def classify_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], *,
                     autocast: AbstractContextManager[object] | None = None) -> list[str]:
    """The label of each prompt (token ids), a batch in one forward pass (right-padded; the head pools
    each row's last non-padding token). The model's config names its padding id; a model saved without
    one uses the tokenizer's."""
    import torch

    if not prompts or any(not p for p in prompts):
        raise ValueError("empty prompt: a classifier needs at least one token")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    labels = head_labels(model)
    with torch.inference_mode(), inference_attention(model), autocast or nullcontext():
        indices = classify_ids(model, prompts, str(next(model.parameters()).device))
    return [labels[i] for i in indices]
