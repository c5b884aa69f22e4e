"""Evaluation items: the rows of an evaluation set that share an input, scored as one item.

For generation tasks (``tuneline.spec.models.GENERATION_TASKS``) one input often has several good
answers: a data-to-text set with ten descriptions per meaning representation, a source sentence
with two translations. Scoring each row on its own would count the input ten times and score each
answer against one reference, where BLEU, chrF and ROUGE are defined against all of them. So the
rows that share an input (compared as curation's exact deduplication compares texts: casefolded,
whitespace collapsed) become one item: the first row's prompt and ``where``, with every distinct
answer of the group, in row order, as its ``references``. Bootstrap intervals and paired tests
then resample items, not rows.

Classification and structured tasks (one correct output per input) keep one item per row.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from tuneline.curation.steps import input_of
from tuneline.curation.textops import dedup_key
from tuneline.data.examples import Example
from tuneline.spec.models import GENERATION_TASKS


def item_key(ex: Example) -> str:
    """The key under which rows are one item: the input (retrieved or fixed example turns left
    out), casefolded with whitespace collapsed."""

    if ex.demonstrations:
        system = [m for m in ex.messages if m["role"] == "system"]
        turns = [m for m in ex.messages if m["role"] != "system"][ex.demonstrations:]
        ex = replace(ex, messages=tuple(system + turns), demonstrations=0)
    return dedup_key(input_of(ex))


def group_items(examples: Sequence[Example], task_type: str) -> list[Example]:
    """One :class:`Example` per distinct input for generation tasks, in order of first appearance.

    Each item is its group's first row with ``references`` set to every distinct answer of the
    group in row order (a row that already carries ``references`` contributes all of them). A
    group of one row with one answer stays as it was. Other tasks: ``examples`` unchanged."""
    if task_type not in GENERATION_TASKS:
        return list(examples)
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(item_key(ex), []).append(ex)
    items = []
    for rows in groups.values():
        first = rows[0]
        answers: list[str] = []
        for ex in rows:
            for ref in ex.all_references:
                if ref not in answers:
                    answers.append(ref)
        if len(answers) == 1 and not first.references:
            items.append(first)
        else:
            items.append(replace(first, references=tuple(answers)))
    return items


def references_per_item(counts: Sequence[int]) -> tuple[int, float, int] | None:
    """(min, median, max) of the number of references per item; None for no items."""
    if not counts:
        return None
    return min(counts), float(statistics.median(counts)), max(counts)


def describe_references(counts: Sequence[int]) -> str:
    """``"1 reference per item"`` or ``"references per item 1/3/10 (min/median/max)"``."""
    summary = references_per_item(counts)
    if summary is None:
        return "no items"
    low, median, high = summary
    if low == high:
        return f"{low} reference{'s' if low != 1 else ''} per item"
    return f"references per item {low}/{median:g}/{high} (min/median/max)"
