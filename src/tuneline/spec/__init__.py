"""The ``tuneline.yaml`` spec: typed models, loading with line-numbered errors, JSON Schema."""

from tuneline.spec.loader import LoadedSpec, json_schema, load_spec, parse_spec
from tuneline.spec.models import (
    TASK_COLUMNS,
    TASK_METRICS,
    DataSource,
    Spec,
    Threshold,
)

__all__ = [
    "TASK_COLUMNS",
    "TASK_METRICS",
    "DataSource",
    "LoadedSpec",
    "Spec",
    "Threshold",
    "json_schema",
    "load_spec",
    "parse_spec",
]
