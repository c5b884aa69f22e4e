"""The metric catalogue: which metrics each task type reports, which are better lower, and the
robustness perturbations. Gates (:mod:`tuneline.spec.gates`), search and early stopping name
metrics from here; evaluation reports them."""

from __future__ import annotations

from typing import Literal

# Metrics each task type can report; objective thresholds must name one of these.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "invalid_rate"),
    "instruction": ("rouge_l", "bleu", "chrf", "exact_match"),
    "chat": ("rouge_l", "bleu", "chrf", "exact_match"),
    "summarization": ("rouge_l", "bleu", "chrf", "exact_match"),
    "translation": ("bleu", "chrf", "exact_match"),
    "structured": ("json_valid", "field_accuracy", "exact_match", "rouge_l", "bleu", "chrf"),
}
# Reported for every task: mean answer length in tokens, share of refusals, share of answers that
# ended on their own (not at the token limit).
COMMON_METRICS: tuple[str, ...] = ("answer_tokens", "refusal_rate", "stopped_rate")

# Lower is better for these (the validation loss, rates of errors, answer length, canaries the model
# reproduced: the memorization probe's gate quantity, see tuneline.spec.gates); every other
# metric: higher is better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"eval_loss", "invalid_rate", "refusal_rate", "answer_tokens",
                                             "canary_leak"})

# How the robustness check perturbs inputs (a gate reads each as ``robustness.KIND``)
Perturbation = Literal["typos", "casing", "whitespace", "paraphrase"]
PERTURBATION_NAMES: tuple[Perturbation, ...] = ("typos", "casing", "whitespace", "paraphrase")


def validation_metrics(task: str) -> tuple[str, ...]:
    """Metrics measured on the validation split during training (search, early stopping)."""
    return ("eval_loss", *TASK_METRICS[task])


def validation_metric_problem(metric: str, task: str) -> str | None:
    """Why ``metric`` cannot be measured on the validation split during training (None when it can)."""
    allowed = validation_metrics(task)
    return None if metric in allowed else f"{metric!r} is not measured for task {task!r}; use one of {list(allowed)}"
