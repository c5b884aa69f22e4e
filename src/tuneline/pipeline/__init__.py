"""Run a spec end to end: data -> base-model evaluation -> training -> evaluation -> registry.

``tuneline run`` is a sequence of typed stages over one :class:`~tuneline.context.RunContext`
(:mod:`tuneline.pipeline.stages`); ``eval``, ``tune`` and ``baseline`` reuse its pieces
(:mod:`tuneline.pipeline.commands`). See docs/architecture.md for the stage diagram.
"""

from tuneline.context import RunContext, curation_summary, open_context, prepare_version
from tuneline.pipeline.commands import RunResult, baseline, evaluate, run, tune, validate
from tuneline.pipeline.evaluation import (
    decoding_mismatch,
    eval_sets,
    evaluated_decoding,
    evaluation_items,
    load_adapter_model,
)
from tuneline.pipeline.stages import run_fingerprint
from tuneline.pipeline.systems import hybrid_retriever, measure_baselines, with_retrieval

__all__ = [
    "RunContext",
    "RunResult",
    "baseline",
    "curation_summary",
    "decoding_mismatch",
    "eval_sets",
    "evaluated_decoding",
    "evaluate",
    "evaluation_items",
    "hybrid_retriever",
    "load_adapter_model",
    "measure_baselines",
    "open_context",
    "prepare_version",
    "run",
    "run_fingerprint",
    "tune",
    "validate",
    "with_retrieval",
]
