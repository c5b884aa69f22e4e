"""Data stage: read the spec's sources, validate every row, map columns, build task examples.

``prepare(loaded_spec)`` is the entry function. It reports every bad row at once (file, line,
field) and raises before anything is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneline.data.examples import Example, build_examples, check_columns, sample_examples
from tuneline.data.readers import Record, read_records
from tuneline.data.tokenize import IGNORE_INDEX, Encoded, encode_example, encode_prompt, end_of_turn
from tuneline.errors import DataError, Problem
from tuneline.spec.loader import LoadedSpec

MAX_LISTED_PROBLEMS = 25

__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "Example",
    "PreparedData",
    "Record",
    "SourceInfo",
    "encode_example",
    "encode_prompt",
    "end_of_turn",
    "prepare",
    "read_records",
]


@dataclass(frozen=True)
class SourceInfo:
    split: str
    path: str
    sha256: str
    rows_read: int
    rows_used: int


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    test: list[Example]
    labels: list[str] | None
    sources: list[SourceInfo] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {s.split: {"path": s.path, "rows_read": s.rows_read, "rows_used": s.rows_used} for s in self.sources}


def _raise_if(problems: list[Problem], what: str) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > MAX_LISTED_PROBLEMS:
        shown.append(Problem(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more problems of the same kinds"))
    raise DataError(shown, title=f"{what}; nothing was trained")


def prepare(loaded: LoadedSpec) -> PreparedData:
    """Read, validate and sample the train/eval/test sources of a spec."""
    spec = loaded.spec
    problems: list[Problem] = []
    splits: dict[str, list[Example]] = {"train": [], "eval": [], "test": []}
    sources: list[SourceInfo] = []
    for split in ("train", "eval", "test"):
        src = getattr(spec.data, split)
        if src is None:
            continue
        path = loaded.resolve(src.path)
        try:
            read = read_records(path, src.resolved_format(), display=src.path)
        except DataError as exc:
            problems.extend(_with_field(p, f"data.{split}.path") for p in exc.problems)
            continue
        problems.extend(read.problems)
        col_problems = check_columns(spec.task, src, read.columns, f"{src.path}:1", f"data.{split}")
        problems.extend(col_problems)
        if col_problems:
            continue
        examples, row_problems = build_examples(spec.task, src, read.records)
        problems.extend(row_problems)
        if not read.records and not read.problems:
            problems.append(Problem("dataset is empty: no rows", where=src.path, field=f"data.{split}",
                                    hint="add rows or point the spec at another file"))
        if src.sample is not None:
            examples = sample_examples(examples, src.sample.max_rows, src.sample.stratify, src.sample.seed)
        splits[split] = examples
        sources.append(SourceInfo(split, src.path, read.sha256, len(read.records), len(examples)))
    _raise_if(problems, "the data has problems")

    labels = None
    if spec.task.type == "classification":
        labels = list(spec.task.labels) if spec.task.labels else sorted({ex.label or "" for ex in splits["train"]})
        known = set(labels)
        origin = "task.labels" if spec.task.labels else "the labels seen in training data"
        for split, examples in splits.items():
            if split == "train" and not spec.task.labels:
                continue
            for ex in examples:
                if ex.label not in known:
                    problems.append(Problem(f"label {ex.label!r} is not in {origin}", where=ex.where,
                                            field=f"data.{split}",
                                            hint="fix the label, add it to task.labels, or add training rows for it"))
        _raise_if(problems, "the data has labels the model cannot learn")
    return PreparedData(splits["train"], splits["eval"], splits["test"], labels, sources)


def _with_field(p: Problem, field: str) -> Problem:
    return Problem(p.message, where=p.where, field=p.field or field, hint=p.hint)
