"""The task types: what each reads (its logical columns) and which can have several good answers
per input."""

from __future__ import annotations

from typing import Literal

TaskType = Literal["classification", "instruction", "chat", "summarization", "translation", "structured"]
# Tasks where one input may have several good answers: different answers to one input are
# references (all kept, all scored against), not conflicts. Classification and structured
# (one correct output per input) treat them as conflicts.
GENERATION_TASKS: tuple[str, ...] = ("instruction", "chat", "summarization", "translation")

# Logical columns each task type reads, and which of them must be present.
TASK_COLUMNS: dict[str, dict[str, bool]] = {
    "classification": {"text": True, "label": True},
    "instruction": {"instruction": True, "input": False, "response": True},
    "chat": {"messages": True},
    "summarization": {"text": True, "summary": True},
    "translation": {"source": True, "target": True},
    "structured": {"instruction": True, "input": False, "response": True},  # the response is JSON
}
