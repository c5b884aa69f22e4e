"""Score a model on validation rows while it trains: early stopping and search trials.

The same generation and metrics as the evaluation (constrained labels for classification), on a
seeded sample of the validation split, so a search optimizes what the gates later check; or the
teacher-forced answer loss (``eval_loss``), which needs no generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from tuneline.data.examples import Example, sample_rows
from tuneline.errors import EvaluationError, Problem
from tuneline.eval.generate import Decoding, GenerateOptions, LabelTrie, generate_detailed
from tuneline.eval.items import group_items
from tuneline.eval.metrics import bleu_tokenize_for, score
from tuneline.runtime import autocast_for
from tuneline.spec.models import LOWER_IS_BETTER, Spec
from tuneline.train.loop import encode_all, evaluate_loss

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = ["RowSample", "make_scorer", "maximize", "sample_rows"]  # sample_rows: see tuneline.data.examples


@dataclass(frozen=True)
class RowSample:
    """How many validation rows (items, for a generated metric) a score reads, and the sample's seed."""

    rows: int = 200
    seed: int = 0


def make_scorer(spec: Spec, tokenizer: PreTrainedTokenizerBase, examples: list[Example], labels: list[str] | None, metric: str, *,
                precision: str, device: str, sample: RowSample | None = None) -> Callable[[nn.Module], float]:
    """``score(model) -> value`` of ``metric`` on (a sample of) ``examples``; a generated metric
    scores items (rows sharing an input grouped, :func:`tuneline.eval.items.group_items`)."""
    if not examples:
        raise EvaluationError(Problem(
            f"validating on {metric!r} needs a validation split, and this spec has none",
            field="data.eval", hint="add data.eval, or set curation.split.validation above 0"))
    if metric != "eval_loss":  # generated answers are scored per item, all of an input's answers its references
        examples = group_items(examples, spec.task.type)
    sample = sample or RowSample()
    picked = sample_rows(examples, sample.rows, sample.seed)
    if metric == "eval_loss":
        encoded = encode_all(tokenizer, picked, spec.train.seq_len)[0]
        pad = tokenizer.pad_token_id

        def loss(model: nn.Module) -> float:
            return evaluate_loss(model, encoded, spec.eval.batch_size, pad, precision, device)

        return loss

    trie = None
    if spec.task.type == "classification" and spec.eval.constrain_to_labels and labels:
        eos = cast("int | None", tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None)
        trie = LabelTrie(tokenizer, labels, picked[0], eos)
    references = [ex.all_references for ex in picked]
    tokenize = bleu_tokenize_for(spec)
    decoding = Decoding(max_new_tokens=trie.max_len) if trie else Decoding.of(spec.decoding)

    def generated(model: nn.Module) -> float:
        out = generate_detailed(model, tokenizer, picked, GenerateOptions(
            batch_size=spec.eval.batch_size, decoding=decoding, autocast=autocast_for(precision, device),
            device=device, show_progress=False, labels=trie, share_prefix=len(picked) > 1))
        scored = score(spec.task.type, out.texts, references, labels, primary=spec.objective.primary,
                       answer_tokens=out.tokens, stopped=out.stopped, bleu_tokenize=tokenize)
        values = scored.values()
        if metric not in values:  # structured json_valid/field_accuracy with references that are not JSON
            raise EvaluationError(Problem(
                f"validation metric {metric!r} is not measured on these rows (their answers are not JSON)",
                hint="validate (early stopping, search) on exact_match, rouge_l or eval_loss"))
        return values[metric]

    return generated


def maximize(metric: str, direction: str | None = None) -> bool:
    """Whether a higher value of ``metric`` is better (``direction`` overrides)."""
    if direction is not None:
        return direction == "maximize"
    return metric not in LOWER_IS_BETTER
