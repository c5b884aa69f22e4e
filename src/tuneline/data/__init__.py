"""Data stage: read the spec's sources, validate every row, map columns, build task examples,
curate them (:mod:`tuneline.curation`).

``prepare(loaded_spec)`` is the entry function. It reports every bad row at once (file, line,
field) and raises before anything is trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneline.data.examples import Example
from tuneline.data.readers import Record, read_records
from tuneline.data.tokenize import IGNORE_INDEX, Encoded, encode_example, encode_prompt, end_of_turn
from tuneline.spec.loader import LoadedSpec

if TYPE_CHECKING:
    from tuneline.curation import Curated, SourceInfo
    from tuneline.spec.models import GoldenSetSpec

__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "Example",
    "PreparedData",
    "Record",
    "encode_example",
    "encode_prompt",
    "end_of_turn",
    "prepare",
    "read_golden_examples",
    "read_records",
]


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    test: list[Example]
    labels: list[str] | None
    sources: list[SourceInfo] = field(default_factory=list)
    curated: Curated | None = None

    def summary(self) -> dict[str, Any]:
        return {s.split: {"path": s.path, "rows_read": s.rows_read, "rows_used": s.rows_used} for s in self.sources}


def prepare(loaded: LoadedSpec, tokenizer: Any = None) -> PreparedData:
    """Read, validate, curate and sample the train/eval/test sources of a spec.

    Raises :class:`DataError` listing every row that breaks a check whose policy is ``fail``
    (file, line, field). ``tokenizer`` enables the too-long check."""
    from tuneline.curation import curate

    curated = curate(loaded, tokenizer)
    splits = curated.splits
    used = {"train": len(splits["train"]), "validation": len(splits["validation"]), "test": len(splits["test"])}
    sources = [dataclasses.replace(s, rows_used=used[s.split]) for s in curated.sources]
    return PreparedData(splits["train"], splits["validation"], splits["test"], curated.labels, sources, curated)


def read_golden_examples(loaded: LoadedSpec, g: GoldenSetSpec) -> tuple[list[Example], str]:
    """The golden set's examples and the file's SHA-256; any bad row is an error (a golden set is clean)."""
    from tuneline.data.examples import build_examples, check_columns
    from tuneline.errors import DataError, Problem

    field = f"eval.golden.{g.name}"
    read = read_records(loaded.resolve(g.path), g.resolved_format(), display=g.path)
    problems = list(read.problems)
    problems += check_columns(loaded.spec.task, g, read.columns, f"{g.path}:1", field)
    if problems:
        raise DataError(problems, title=f"golden set {g.name!r} cannot be read")
    examples, row_problems = build_examples(loaded.spec.task, g, read.records)
    if row_problems:
        raise DataError(row_problems, title=f"golden set {g.name!r} has bad rows")
    if not examples:
        raise DataError(Problem("golden set is empty", where=g.path, field=field, hint="add rows or remove the set"))
    return examples, read.sha256
