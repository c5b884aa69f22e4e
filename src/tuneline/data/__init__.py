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
