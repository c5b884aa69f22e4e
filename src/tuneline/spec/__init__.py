"""The ``tuneline.yaml`` spec: typed models, loading with line-numbered errors, JSON Schema.

Modules: :mod:`~tuneline.spec.models` (the schema), :mod:`~tuneline.spec.tasks` (task types and
their columns), :mod:`~tuneline.spec.metrics` (the metric catalogue), :mod:`~tuneline.spec.gates`
(the gate grammar), :mod:`~tuneline.spec.checks` (rules across sections),
:mod:`~tuneline.spec.dotted` (dotted paths a search sets), :mod:`~tuneline.spec.loader` (YAML to a
validated spec, every problem with its line).
"""

from tuneline.spec.checks import CrossProblem, cross_field_problems
from tuneline.spec.dotted import set_path
from tuneline.spec.gates import GATE_SYSTEMS, SPECIAL_GATES, Threshold, gate_name_problem
from tuneline.spec.loader import LoadedSpec, json_schema, load_spec, parse_spec
from tuneline.spec.metrics import (
    COMMON_METRICS,
    LOWER_IS_BETTER,
    PERTURBATION_NAMES,
    TASK_METRICS,
    validation_metric_problem,
)
from tuneline.spec.models import (
    PII_TYPES,
    CurationSpec,
    DataSource,
    DecodingSpec,
    DedupSpec,
    EvalSpec,
    GoldenSetSpec,
    LoraSpec,
    ObjectiveSpec,
    ParamSpace,
    PiiType,
    SearchSpec,
    Spec,
    TaskSpec,
    TrainSpec,
)
from tuneline.spec.monitor import MonitorSpec, WebhookSink
from tuneline.spec.tasks import GENERATION_TASKS, TASK_COLUMNS, TaskType

__all__ = [
    "MonitorSpec",
    "WebhookSink",
    "COMMON_METRICS",
    "GATE_SYSTEMS",
    "GENERATION_TASKS",
    "LOWER_IS_BETTER",
    "PERTURBATION_NAMES",
    "PII_TYPES",
    "SPECIAL_GATES",
    "TASK_COLUMNS",
    "TASK_METRICS",
    "CrossProblem",
    "CurationSpec",
    "DataSource",
    "DecodingSpec",
    "DedupSpec",
    "EvalSpec",
    "GoldenSetSpec",
    "LoadedSpec",
    "LoraSpec",
    "ObjectiveSpec",
    "ParamSpace",
    "PiiType",
    "SearchSpec",
    "Spec",
    "TaskSpec",
    "TaskType",
    "TrainSpec",
    "Threshold",
    "cross_field_problems",
    "gate_name_problem",
    "json_schema",
    "load_spec",
    "parse_spec",
    "set_path",
    "validation_metric_problem",
]
