"""Answers of a classifier-head system (``task.head: classifier``): one forward pass per batch, the
label of the highest logit, in the :class:`~tuneline.eval.generate.Generation` form every metric,
interval, gate and report reads. No token is generated: each answer counts as stopped, 0 tokens long."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tuneline.data.examples import Example
from tuneline.data.tokenize import encode_prompt
from tuneline.eval.generate import GenerateOptions, Generation
from tuneline.models.loading import inference_attention
from tuneline.runtime.progress import progress_bar
from tuneline.train.classifier import padded

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def classifier_of(model: torch.nn.Module) -> PreTrainedModel | None:
    """The transformers sequence-classification model ``model`` is (or a peft model wraps); None for
    any other model (a causal LM generates its answers)."""
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel's
    inner = model if get_base_model is None else get_base_model()
    return inner if type(inner).__name__.endswith("ForSequenceClassification") else None  # type: ignore[return-value]


def is_classifier(model: torch.nn.Module) -> bool:
    return classifier_of(model) is not None


def head_labels(model: torch.nn.Module) -> list[str]:
    """The labels of the classifier's outputs, in index order (``config.id2label``)."""
    inner = classifier_of(model)
    if inner is None:
        raise TypeError(f"{type(model).__name__} is not a sequence classifier")
    # transformers keys id2label by int once a config is loaded (its type also allows str keys)
    id2label = {int(k): str(v) for k, v in (inner.config.id2label or {}).items()}
    return [id2label[i] for i in range(len(id2label))]


def pad_id_of(model: torch.nn.Module) -> int:
    inner = classifier_of(model)
    pad = None if inner is None else inner.config.pad_token_id
    if pad is None:
        raise ValueError("the classifier's config has no pad_token_id: it could not find each row's last token")
    return int(pad)


def classify_ids(model: torch.nn.Module, prompts: list[list[int]], device: str = "cpu") -> list[int]:
    """The index of the highest logit for each prompt (token ids), in one forward pass, right-padded
    with the classifier's ``pad_token_id`` (the head pools each row's last non-padding token)."""
    ids, mask = padded(prompts, pad_id_of(model), device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [int(i) for i in logits.argmax(dim=-1).tolist()]


def classify_detailed(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                      options: GenerateOptions) -> Generation:
    """The classifier's label for each example's prompt (the rendered chat prompt the generative model
    would get), in input order; batches of ``options.batch_size`` prompts of similar length. Of
    ``options`` only the batch size, autocast, device and progress bar apply (nothing is decoded)."""
    import torch

    labels = head_labels(model)
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    model.eval()
    t0 = time.perf_counter()
    bar = progress_bar(enabled=options.show_progress)
    with bar, torch.inference_mode(), inference_attention(model), options.autocast:
        task = bar.add_task(options.description, total=len(prompts))
        for b in range(0, len(order), options.batch_size):
            idx = order[b : b + options.batch_size]
            for i, k in zip(idx, classify_ids(model, [prompts[i] for i in idx], options.device), strict=True):
                answers[i] = labels[k]
            bar.update(task, advance=len(idx))
    n = len(prompts)
    return Generation(answers, (time.perf_counter() - t0) / max(1, n), [True] * n, [0] * n)
