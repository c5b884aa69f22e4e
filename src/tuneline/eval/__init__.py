"""Evaluation: every system (base, candidate, production) on the test split and golden sets, with
95% intervals, paired tests, flips, forgetting, robustness, latency and the spec's gates."""

from __future__ import annotations

from tuneline.eval.gates import check_gates, describe_failures
from tuneline.eval.generate import Generation, LabelTrie, generate, generate_detailed
from tuneline.eval.golden import GoldenSet, GoldenSetChanged, load_golden, register_golden
from tuneline.eval.metrics import classification_metrics, normalize_label, score
from tuneline.eval.report import flat_metrics, render_tables
from tuneline.eval.results import EvalSuite, GateResult
from tuneline.eval.suite import EvalSet, Evaluation

__all__ = [
    "EvalSet",
    "EvalSuite",
    "Evaluation",
    "GateResult",
    "Generation",
    "GoldenSet",
    "GoldenSetChanged",
    "LabelTrie",
    "check_gates",
    "classification_metrics",
    "describe_failures",
    "flat_metrics",
    "generate",
    "generate_detailed",
    "load_golden",
    "normalize_label",
    "register_golden",
    "render_tables",
    "score",
]
