"""Evaluation: batched greedy generation on held-out data, task metrics, objective thresholds."""

from __future__ import annotations

from typing import Any

from tuneline.data.examples import Example
from tuneline.eval.generate import LabelTrie, generate
from tuneline.eval.metrics import classification_metrics, normalize_label, text_metrics
from tuneline.eval.report import (
    EvalReport,
    ModelResult,
    ThresholdCheck,
    check_objective,
    render_table,
)
from tuneline.spec.models import Spec

__all__ = [
    "EvalReport",
    "LabelTrie",
    "ModelResult",
    "ThresholdCheck",
    "check_objective",
    "classification_metrics",
    "evaluate_model",
    "generate",
    "normalize_label",
    "render_table",
    "score",
    "text_metrics",
]


def score(spec: Spec, predictions: list[str], examples: list[Example], labels: list[str] | None) -> dict[str, float]:
    refs = [ex.reference for ex in examples]
    if spec.task.type == "classification":
        assert labels is not None
        return classification_metrics(predictions, refs, labels)
    return text_metrics(predictions, refs)


def evaluate_model(
    name: str,
    spec: Spec,
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    labels: list[str] | None,
    *,
    autocast: Any,
    device: str = "cpu",
    show_progress: bool = True,
) -> ModelResult:
    """Generate answers for ``examples`` with ``model`` and score them."""
    trie = None
    if spec.task.type == "classification" and spec.eval.constrain_to_labels and labels and examples:
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
        trie = LabelTrie(tokenizer, labels, examples[0], eos)
    preds, spe = generate(
        model, tokenizer, examples, batch_size=spec.eval.batch_size,
        max_new_tokens=trie.max_len if trie else spec.eval.max_new_tokens,  # a label never needs more
        autocast=autocast, device=device, description=f"eval {name}", show_progress=show_progress, labels=trie,
    )
    return ModelResult(name, score(spec, preds, examples, labels), spe, preds)
