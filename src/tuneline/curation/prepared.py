"""``prepare(loaded_spec)``: the data stage's entry function. It reads the spec's sources, validates
every row, maps columns, builds task examples and curates them (:func:`tuneline.curation.curate`),
and returns the train / evaluation / test examples a run uses.

It reports every bad row at once (file, line, field) and raises before anything is trained. (It
lived in :mod:`tuneline.data` before; it sits here, above the data readers, so that ``data`` does not
import ``curation``.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuneline.curation.canary import Canary, planted_rows, with_rows
from tuneline.curation.erasure import ErasureFilter
from tuneline.curation.pipeline import Curated, SourceInfo, curate
from tuneline.curation.preferences import PreferencePair
from tuneline.curation.version import DatasetVersion
from tuneline.data.examples import Example
from tuneline.errors import DataError, Problem
from tuneline.spec.loader import LoadedSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase

__all__ = ["PreparedData", "prepare", "prepared_from"]


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]  # the validation split
    test: list[Example]
    labels: list[str] | None
    sources: list[SourceInfo] = field(default_factory=list)
    curated: Curated | None = None
    canaries: list[Canary] = field(default_factory=list)  # eval.canaries: what evaluation probes
    canary_rows: list[Example] = field(default_factory=list)  # the planted canaries' training rows
    preferences: list[PreferencePair] = field(default_factory=list)  # data.preferences, curated (dpo)

    def with_canary_rows(self, augment: Callable[[list[Example]], list[Example]] | None = None) -> PreparedData:
        """This data as training sees it: the planted canaries' rows added to the training rows
        (``augment``: as the hybrid shows a prompt); ``self`` when there are none."""
        if not self.canary_rows:
            return self
        return dataclasses.replace(self, train=with_rows(self.train, self.canary_rows, augment))

    def summary(self) -> dict[str, dict[str, str | int]]:
        return {s.split: {"path": s.path, "rows_read": s.rows_read, "rows_used": s.rows_used} for s in self.sources}


def prepared_from(version: DatasetVersion, loaded: LoadedSpec) -> PreparedData:
    """The data of a stored dataset version, as :func:`prepare` returned it when the version was
    made (``tuneline run SPEC --dataset ID``: train on it again, here or on another machine)."""
    m = version.manifest
    if m["spec"] != loaded.spec.name:
        raise DataError(Problem(f"dataset version {version.id} was prepared for spec {m['spec']!r}, not "
                                f"{loaded.spec.name!r}", hint="use a version of this spec (`tuneline data list`)"))
    canaries, cfg = version.canaries(), loaded.spec.eval.canaries
    if bool(canaries) != (cfg is not None):
        raise DataError(Problem(f"dataset version {version.id} was made {'with' if canaries else 'without'} "
                                "eval.canaries, and this spec is not", field="eval.canaries",
                                hint="use the spec the version was prepared with"))
    rows = planted_rows([c for c in canaries if c.kind == "planted"], cfg.repeat) if cfg is not None else []
    used = m["counts"]
    sources = [SourceInfo(s["split"], s["path"], s["sha256"], s["rows"], used.get(s["split"], 0)) for s in m["sources"]]
    return PreparedData(version.split("train"), version.split("validation"), version.split("test"), m.get("labels"),
                        sources, None, canaries, rows, version.preferences())


def prepare(loaded: LoadedSpec, tokenizer: PreTrainedTokenizerBase | None = None,
            erased: ErasureFilter | None = None) -> PreparedData:
    """Read, validate, curate and sample the train/eval/test sources of a spec.

    Raises :class:`DataError` listing every row that breaks a check whose policy is ``fail``
    (file, line, field). ``tokenizer`` enables the too-long check; ``erased`` drops the rows of the
    workspace's erasure requests (:func:`tuneline.curation.erasure.load_filter`)."""
    curated = curate(loaded, tokenizer, erased)
    splits = curated.splits
    used = {"train": len(splits["train"]), "validation": len(splits["validation"]), "test": len(splits["test"])}
    sources = [dataclasses.replace(s, rows_used=used[s.split]) for s in curated.sources]
    return PreparedData(splits["train"], splits["validation"], splits["test"], curated.labels, sources, curated,
                        curated.canaries, curated.canary_rows, curated.preferences.pairs)
