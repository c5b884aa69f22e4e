"""Data readers and examples: read a source file (:mod:`tuneline.data.readers`), validate rows and
build task examples (:mod:`tuneline.data.examples`), template and tokenize them
(:mod:`tuneline.data.tokenize`).

The data stage's entry function, ``prepare(loaded_spec)``, curates as well and lives one layer up
in :mod:`tuneline.curation` (``from tuneline.curation import prepare``).
"""

from __future__ import annotations

from tuneline.data.examples import Example, build_examples, check_columns
from tuneline.data.readers import Record, read_records
from tuneline.data.tokenize import IGNORE_INDEX, Encoded, encode_example, encode_prompt, end_of_turn
from tuneline.errors import DataError, Problem
from tuneline.spec.loader import LoadedSpec
from tuneline.spec.models import GoldenSetSpec

__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "Example",
    "Record",
    "encode_example",
    "encode_prompt",
    "end_of_turn",
    "read_golden_examples",
    "read_records",
]


def read_golden_examples(loaded: LoadedSpec, g: GoldenSetSpec) -> tuple[list[Example], str]:
    """The golden set's examples and the file's SHA-256; any bad row is an error (a golden set is clean)."""
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
