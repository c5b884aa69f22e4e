"""The gate grammar: a threshold such as ``accuracy >= 0.85`` or ``accuracy - base.accuracy >= 0.10``,
and which quantities a gate may name for a task (see :mod:`tuneline.eval.gates` for reading them)."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tuneline.spec.metrics import COMMON_METRICS, PERTURBATION_NAMES, TASK_METRICS

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NUM = r"-?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?"
_TERM = r"[a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_-]+)*"
_GATE_RE = re.compile(rf"^\s*({_TERM}(?:\s*[-+]\s*{_TERM})*)\s*(>=|<=|>|<)\s*({_NUM})\s*$")

# Gate quantities every task has beside its metrics (see tuneline.eval.gates)
SPECIAL_GATES = ("forgetting", "robustness_drop", "p50_latency_ms", "p95_latency_ms", "tokens_per_second",
                 "human_win_rate", "canary_leak")
# Systems whose metrics a gate may read as ``SYSTEM.metric`` (the candidate's own: ``metric``)
GATE_SYSTEMS = ("base", "candidate", "production")


class Threshold(BaseModel):
    """A gate such as ``accuracy >= 0.85`` or ``accuracy - base.accuracy >= 0.10``.

    The left side is one quantity or a sum/difference of several: a metric of the candidate
    (``accuracy``), of another system (``base.accuracy``, ``production.accuracy``), of the
    candidate on a golden set (``golden.NAME.accuracy``, ``golden.NAME.base.accuracy``), or one of
    ``forgetting``, ``robustness_drop``, ``robustness.KIND``, ``p50_latency_ms``, ``p95_latency_ms``,
    ``tokens_per_second``, ``human_win_rate``, ``canary_leak`` (canaries the candidate reproduced)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    terms: list[tuple[int, str]]  # (+1 or -1, quantity)
    op: Literal[">=", ">", "<=", "<"]
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        m = _GATE_RE.match(text)
        if not m:
            raise ValueError(
                f"cannot read threshold {text!r}; write it as 'metric >= value', e.g. 'accuracy >= 0.85' "
                "or 'accuracy - base.accuracy >= 0.10'"
            )
        lhs = m.group(1)
        terms: list[tuple[int, str]] = []
        for sign, name in re.findall(rf"([-+]?)\s*({_TERM})", lhs):
            terms.append((-1 if sign == "-" else 1, name))
        return cls(terms=terms, op=m.group(2), value=float(m.group(3)))  # type: ignore[arg-type]

    @property
    def metric(self) -> str:
        """The first quantity (the whole left side for a simple threshold)."""
        return self.terms[0][1]

    @property
    def lhs(self) -> str:
        out = ""
        for i, (sign, name) in enumerate(self.terms):
            out += (name if sign > 0 else f"-{name}") if i == 0 else (f" + {name}" if sign > 0 else f" - {name}")
        return out

    def check(self, observed: float) -> bool:
        return bool(_OPS[self.op](observed, self.value))

    def margin(self, observed: float) -> float:
        """How far past (positive) or short of (negative) the threshold ``observed`` is."""
        return observed - self.value if self.op in (">=", ">") else self.value - observed

    def __str__(self) -> str:
        return f"{self.lhs} {self.op} {self.value:g}"


def gate_name_problem(name: str, task: str, golden: list[str]) -> str | None:
    """Why ``name`` is not a quantity a gate can read for ``task`` (None when it is)."""
    metrics = (*TASK_METRICS[task], *COMMON_METRICS)
    parts = name.split(".")
    if name in SPECIAL_GATES:
        return None
    if parts[0] == "robustness" and len(parts) == 2:
        return None if parts[1] in PERTURBATION_NAMES else (
            f"unknown perturbation {parts[1]!r}; choose one of {list(PERTURBATION_NAMES)}")
    if parts[0] == "golden":
        if len(parts) < 3:
            return f"{name!r}: write golden.NAME.metric or golden.NAME.base.metric"
        if parts[1] not in golden:
            return f"{name!r}: no golden set named {parts[1]!r} in eval.golden (have {golden})"
        parts = parts[2:]
    if len(parts) == 2 and parts[0] in GATE_SYSTEMS:
        parts = parts[1:]
    if len(parts) == 1 and parts[0] in metrics:
        return None
    return (f"{name!r} is not reported for task {task!r}; use one of {list(metrics)} (optionally prefixed "
            f"base., production. or golden.NAME.), or {list(SPECIAL_GATES)}")
