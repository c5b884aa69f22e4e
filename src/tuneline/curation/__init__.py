"""Data curation and dataset versions.

``prepare(loaded_spec, tokenizer)`` is the data stage (:mod:`tuneline.curation.prepared`).
``curate(loaded_spec, tokenizer)`` reads a spec's sources and runs the curation steps
(:mod:`tuneline.curation.pipeline`); ``save_version`` stores the result as a dataset version
(:mod:`tuneline.curation.version`): Parquet splits, a manifest, every rejected row with its reason,
and a data card. The PII redactor (:mod:`tuneline.curation.pii`) is shared with the server's
request log.
"""

from __future__ import annotations

from tuneline.curation.pipeline import Curated, SourceInfo, curate
from tuneline.curation.prepared import PreparedData, prepare
from tuneline.curation.steps import Reject, StepReport
from tuneline.curation.version import (
    DatasetVersion,
    diff_versions,
    list_versions,
    load_version,
    save_version,
    version_id,
)

__all__ = [
    "Curated",
    "DatasetVersion",
    "PreparedData",
    "Reject",
    "SourceInfo",
    "StepReport",
    "curate",
    "diff_versions",
    "list_versions",
    "load_version",
    "prepare",
    "save_version",
    "version_id",
]
