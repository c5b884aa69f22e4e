"""Errors a user can cause, each saying what was wrong, where, and what to do.

Hierarchy::

    TunelineError            base class; carries a list of Problem (one or many)
     +-- SpecError           tuneline.yaml does not parse or does not validate
     +-- DataError           a data file is missing, unreadable, or has bad rows
     +-- ModelError          a model source cannot be resolved or loaded
     +-- TrainingError       training cannot start or continue (e.g. nothing to resume)
     +-- EvaluationError     a model cannot be evaluated or scored (no rows, no adapter, a metric not measured)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    ``where`` is a location a person can open: ``path/to/file.csv:17`` or ``tuneline.yaml:4``.
    ``field`` is the spec field path or data column involved. ``hint`` says what to do.
    """

    message: str
    where: str | None = None
    field: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        head = ": ".join(p for p in (self.where, self.field) if p)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class TunelineError(Exception):
    """Base class for every error tuneline raises on purpose."""

    def __init__(self, problems: str | Problem | list[Problem], *, title: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"- {p}" for p in self.problems]
        if self.title:
            n = len(self.problems)
            return f"{self.title} ({n} problem{'s' if n != 1 else ''}):\n" + "\n".join(lines)
        if len(self.problems) == 1:
            return str(self.problems[0])
        return "\n".join(lines)


class SpecError(TunelineError):
    """The spec file does not parse or does not validate."""


class DataError(TunelineError):
    """A data source is missing, unreadable, empty, or has bad rows."""


class ModelError(TunelineError):
    """A model source cannot be resolved or loaded."""


class TrainingError(TunelineError):
    """Training cannot start or continue."""


class EvaluationError(TunelineError):
    """Evaluation cannot start: nothing to evaluate, no adapter where one was named."""
