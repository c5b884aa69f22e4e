"""Turn raw records into task examples (chat messages + expected answer), validating each row."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TypeVar

from tuneline.data.readers import Record
from tuneline.errors import Problem
from tuneline.spec import GENERATION_TASKS, TASK_COLUMNS, DataSource, TaskSpec

Message = dict[str, str]
log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    ``messages`` is the full conversation including the answer turn(s); the model is trained on
    assistant turns only. ``reference`` is the expected final answer (the label for
    classification), used by evaluation. ``demonstrations`` counts the messages right after the
    system prompt that are retrieved or fixed examples shown as context: they are not trained on.
    ``references`` holds every good answer of an evaluation item (generation tasks: the answers of
    all rows sharing this input); empty for a plain row, whose only reference is ``reference``.
    """

    where: str
    messages: tuple[Message, ...]
    reference: str
    label: str | None = None
    demonstrations: int = 0
    references: tuple[str, ...] = ()

    @property
    def all_references(self) -> tuple[str, ...]:
        """Every reference answer: ``references`` for a grouped item, else ``(reference,)``."""
        return self.references or (self.reference,)

    @property
    def prompt_messages(self) -> list[Message]:
        """Conversation up to (not including) the final assistant turn, for generation."""
        return list(self.messages[:-1])


def column_map(task: TaskSpec, source: DataSource) -> dict[str, str]:
    """Logical column -> file column. Unmapped logical columns keep their own name."""
    return {logical: source.columns.get(logical, logical) for logical in TASK_COLUMNS[task.type]}


def check_columns(task: TaskSpec, source: DataSource, columns: list[str], where: str, field: str) -> list[Problem]:
    """Problems for required mapped columns absent from the file's columns."""
    problems = []
    for logical, required in TASK_COLUMNS[task.type].items():
        actual = column_map(task, source)[logical]
        if required and actual not in columns:
            mapped = f" (mapped from {logical!r})" if actual != logical else ""
            problems.append(Problem(
                f"column {actual!r}{mapped} not found; the file has {columns}",
                where=where, field=f"{field}.columns.{logical}",
                hint=f"map it in the spec: columns: {{{logical}: <your column name>}}",
            ))
    return problems


def _text(value: object) -> str | None:
    """``value`` as text, or None when it is missing, NaN or blank."""
    if type(value) is str:  # the common case; blank means empty or only whitespace
        return value if value and not value.isspace() else None
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from Parquet/pandas
        return None
    s = str(value)
    return s if s.strip() else None


# tasks whose row is one input column (the user turn) and one answer column (the assistant turn)
_INPUT_ANSWER = {"summarization": ("text", "summary"), "translation": ("source", "target")}


def build_examples(task: TaskSpec, source: DataSource, records: list[Record]) -> tuple[list[Example], list[Problem]]:
    """Validate each record and build its :class:`Example`. Bad rows become problems, never skipped.

    Several answers in one row: for a generation task (``GENERATION_TASKS``) the answer column
    (``summary``, ``response``; a chat's answer is its last assistant turn) may hold a list of
    texts in JSONL or Parquet; the row becomes one example per answer, same input, same ``where``
    (training sees every answer; evaluation groups them back into one item). A CSV cell is always
    one text, even one that looks like a JSON list: in CSV, write one row per answer. An empty
    list, or an element that is not a non-empty string, is a problem of the row."""
    builder = _RowBuilder(task, column_map(task, source))
    add = {"classification": builder.classification, "summarization": builder.input_answer,
           "translation": builder.input_answer, "instruction": builder.instruction,
           "structured": builder.instruction}.get(task.type, builder.chat)
    for rec in records:
        add(rec)
    return builder.examples, builder.problems


class _RowBuilder:
    """Builds the examples of one source's records, a method per task type, collecting problems."""

    def __init__(self, task: TaskSpec, cols: dict[str, str]) -> None:
        self.kind = task.type
        self.cols = cols
        prompt = task.system_prompt()  # the instruction, or translation's default naming the language pair
        self.system: list[Message] = [{"role": "system", "content": prompt}] if prompt else []
        self.examples: list[Example] = []
        self.problems: list[Problem] = []

    def required(self, rec: Record, *logicals: str) -> list[str] | None:
        """The non-empty values of ``logicals``, or None after recording each empty one."""
        cols = self.cols
        values = [_text(rec.fields.get(cols[name])) for name in logicals]
        for name, value in zip(logicals, values, strict=True):
            if value is None:
                self.problems.append(Problem(f"empty {cols[name]!r}", where=rec.where, field=cols[name],
                                             hint="fill the cell or remove the row"))
        return None if any(v is None for v in values) else [v for v in values if v is not None]

    def answers(self, rec: Record, logical: str) -> list[str] | None:
        """The answer(s) in column ``logical``: one text, or for a generation task a list of texts
        (JSONL/Parquet) -- each becomes its own row; None after recording what is wrong."""
        col = self.cols[logical]
        value = rec.fields.get(col)
        if not isinstance(value, (list, tuple)) or self.kind not in GENERATION_TASKS:
            return self.required(rec, logical)
        if not value:
            self.problems.append(Problem(f"empty list in {col!r}: no answer", where=rec.where, field=col,
                                         hint="give at least one answer, or remove the row"))
            return None
        texts = []
        for i, item in enumerate(value):
            text = item if isinstance(item, str) and not item.isspace() and item else None
            if text is None:
                what = "an empty text" if isinstance(item, str) else f"a {type(item).__name__}, not a string"
                self.problems.append(Problem(f"answer {i} of the list in {col!r} is {what}", where=rec.where,
                                             field=col, hint="a list of answers holds non-empty strings only"))
                return None
            texts.append(text)
        return texts

    def _add_turns(self, rec: Record, user: str, outputs: list[str]) -> None:
        for output in outputs:  # several answers: one row each, same input and where
            msgs = (*self.system, {"role": "user", "content": user}, {"role": "assistant", "content": output})
            self.examples.append(Example(rec.where, tuple(msgs), output))

    def classification(self, rec: Record) -> None:
        f = rec.fields
        text, label = _text(f.get(self.cols.get("text", ""))), _text(f.get(self.cols.get("label", "")))
        if text is None or label is None:
            self.required(rec, "text", "label")  # records the empty one(s)
            return
        label = label.strip()
        msgs = (*self.system, {"role": "user", "content": text}, {"role": "assistant", "content": label})
        self.examples.append(Example(rec.where, msgs, label, label))

    def input_answer(self, rec: Record) -> None:
        """summarization (text -> summary), translation (source -> target)"""
        input_col, answer_col = _INPUT_ANSWER[self.kind]
        given = self.required(rec, input_col)
        outputs = self.answers(rec, answer_col)
        if given is None or outputs is None:
            return
        self._add_turns(rec, given[0], outputs)

    def instruction(self, rec: Record) -> None:
        """instruction and structured: instruction (+ optional input) -> response"""
        instr = self.required(rec, "instruction")
        responses = self.answers(rec, "response")
        if instr is None or responses is None:
            return
        inp = _text(rec.fields.get(self.cols["input"]))
        self._add_turns(rec, instr[0] if inp is None else f"{instr[0]}\n\n{inp}", responses)

    def chat(self, rec: Record) -> None:
        msgs_or_problem = _chat_messages(rec.fields.get(self.cols["messages"]))
        if isinstance(msgs_or_problem, str):
            self.problems.append(Problem(msgs_or_problem, where=rec.where, field=self.cols["messages"],
                                         hint='expected a list like [{"role": "user", "content": "..."}, '
                                              '{"role": "assistant", "content": "..."}]'))
            return
        turns = msgs_or_problem
        if self.system and turns[0]["role"] != "system":
            turns = [*self.system, *turns]
        self.examples.append(Example(rec.where, tuple(turns), turns[-1]["content"]))


def _chat_messages(value: object) -> list[Message] | str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return f"messages is not valid JSON: {exc.msg}"
    if not isinstance(value, list) or not value:
        return "messages must be a non-empty list"
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return f"message {i} needs role system, user or assistant"
        content = _text(m.get("content"))
        if content is None:
            return f"message {i} ({m['role']}) has empty content"
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "assistant":
        return "the last message must be from the assistant (the answer to learn)"
    return out


def sample_rows(examples: list[T], rows: int, seed: int, *, keep_order: bool = True) -> list[T]:
    """At most ``rows`` of ``examples``, a seeded sample: in input order, or (``keep_order=False``)
    in the order drawn. The one seeded sampler; :func:`sample_examples` adds stratification."""
    if len(examples) <= rows:
        return list(examples)
    picked = random.Random(seed).sample(range(len(examples)), rows)
    return [examples[i] for i in (sorted(picked) if keep_order else picked)]


def sample_examples(examples: list[Example], max_rows: int, stratify: bool, seed: int) -> list[Example]:
    """Deterministic subset of at most ``max_rows``; stratified by label keeps every label present."""
    if len(examples) <= max_rows:
        return list(examples)
    if not stratify or examples[0].label is None:
        return sample_rows(examples, max_rows, seed, keep_order=False)
    rng = random.Random(seed)
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.label or ""].append(ex)
    labels = sorted(groups)
    if max_rows < len(labels):
        log.warning("sample.max_rows=%d is below the %d labels; keeping one row per label (%d rows)",
                    max_rows, len(labels), len(labels))
    for lab in labels:
        rng.shuffle(groups[lab])
    total = len(examples)
    quota = {lab: max(1, (max_rows * len(groups[lab])) // total) for lab in labels}
    # hand out what is left by largest remainder, then trim if min-1 overshot
    left = max_rows - sum(quota.values())
    by_rem = sorted(labels, key=lambda lab: -((max_rows * len(groups[lab])) % total))
    for lab in by_rem:
        if left <= 0:
            break
        if quota[lab] < len(groups[lab]):
            quota[lab] += 1
            left -= 1
    for lab in sorted(labels, key=lambda lab: -quota[lab]):
        if left >= 0:
            break
        if quota[lab] > 1:
            quota[lab] -= 1
            left += 1
    chosen = [ex for lab in labels for ex in groups[lab][: quota[lab]]]
    rng.shuffle(chosen)
    return chosen
