"""Baselines: prompt only, few-shot, retrieval, an embedding classifier, measured beside fine-tuning."""

from tuneline.baseline.options import (
    BaselineReport,
    Context,
    OptionResult,
    SystemCosts,
    add_system,
    measure,
    recommend,
)
from tuneline.baseline.report import baseline_table

__all__ = ["BaselineReport", "Context", "OptionResult", "SystemCosts", "add_system", "baseline_table", "measure", "recommend"]
