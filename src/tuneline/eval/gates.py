"""Gates: the spec's objective conditions checked against an evaluation.

A gate reads quantities by name (see :class:`tuneline.spec.models.Threshold`): ``accuracy`` is the
candidate on the test split, ``base.accuracy`` the base model there, ``golden.NAME.accuracy`` the
candidate on a golden set, plus ``forgetting``, ``robustness_drop``, ``robustness.KIND``,
latency, ``human_win_rate`` and ``canary_leak``. A gate that reads the production model passes with a note while
there is none (nothing to beat yet); any other quantity that was not measured fails the gate.
"""

from __future__ import annotations

from tuneline.eval.results import EvalSuite, GateResult
from tuneline.spec import GATE_SYSTEMS, ObjectiveSpec, Threshold


class Missing(Exception):
    def __init__(self, name: str, why: str, skip: bool = False):
        super().__init__(why)
        self.name, self.why, self.skip = name, why, skip


def quantity(suite: EvalSuite, name: str) -> float:
    """The value of one named quantity in ``suite``; raises :class:`Missing` when not measured."""
    parts = name.split(".")
    if name == "forgetting":
        if suite.forgetting is None:
            raise Missing(name, "forgetting was not measured (eval.forgetting is off)")
        return suite.forgetting.drop
    if name == "robustness_drop" or parts[0] == "robustness":
        return _robustness(suite, name, parts)
    if name in ("p50_latency_ms", "p95_latency_ms", "tokens_per_second"):
        if suite.latency is None:
            raise Missing(name, "latency was not measured (eval.latency.enabled is off)")
        return float(getattr(suite.latency, name.replace("_latency", "")) if name != "tokens_per_second"
                     else suite.latency.tokens_per_second)
    if name == "canary_leak":
        if suite.canaries is None or "candidate" not in suite.canaries.leaked:
            raise Missing(name, "canaries were not probed (eval.canaries is not set, or no canary is in the "
                                "training answers)")
        return float(suite.canaries.leaked["candidate"])
    if name == "human_win_rate":
        if not suite.human:
            raise Missing(name, "no human ratings imported yet (`tuneline eval import-human`)")
        return float(suite.human["win_rate"])
    return _metric(suite, name, parts)


def _robustness(suite: EvalSuite, name: str, parts: list[str]) -> float:
    """``robustness_drop`` (the worst perturbation's) or ``robustness.KIND``."""
    rob = suite.robustness
    if rob is None:
        raise Missing(name, "robustness was not measured (eval.robustness.enabled is off)")
    if name == "robustness_drop":
        return rob.worst_drop
    if parts[1] not in rob.perturbations:
        raise Missing(name, f"perturbation {parts[1]!r} was not run (eval.robustness.perturbations)")
    return rob.perturbations[parts[1]].drop


def _metric(suite: EvalSuite, name: str, parts: list[str]) -> float:
    """``[golden.NAME.][SYSTEM.]METRIC``: a metric of one system on the main or a golden set."""
    target = suite.main_set()
    if parts[0] == "golden":
        target = next((s for s in suite.sets if s.kind == "golden" and s.name == parts[1]), None)  # type: ignore[assignment]
        if target is None:
            raise Missing(name, f"golden set {parts[1]!r} was not evaluated")
        parts = parts[2:]
    system = "candidate"
    if len(parts) == 2 and parts[0] in GATE_SYSTEMS:
        system, parts = parts[0], parts[1:]
    result = target.system(system)
    if result is None:
        raise Missing(name, f"no {system} model was scored" + (": no production model yet" if system == "production" else ""),
                      skip=system == "production")
    metric = parts[0]
    if metric not in result.metrics:
        why = " (json_valid and field_accuracy need references that are JSON)" if metric in (
            "json_valid", "field_accuracy") else ""
        raise Missing(name, f"{metric!r} is not reported for this task{why}")
    return result.metrics[metric].value


def check_gate(suite: EvalSuite, gate: Threshold) -> GateResult:
    total = 0.0
    for sign, name in gate.terms:
        try:
            total += sign * quantity(suite, name)
        except Missing as m:
            return GateResult(str(gate), None, gate.value, passed=m.skip, margin=None,
                              note=("skipped: " if m.skip else "not measured: ") + m.why)
    return GateResult(str(gate), total, gate.value, gate.check(total), gate.margin(total))


def check_gates(objective: ObjectiveSpec, suite: EvalSuite) -> list[GateResult]:
    return [check_gate(suite, g) for g in objective.parsed_thresholds()]


def describe_failures(gates: list[GateResult]) -> list[str]:
    """One line per failed gate: which, the observed value, and by how much it missed."""
    out = []
    for g in gates:
        if g.passed:
            continue
        if g.observed is None:
            out.append(f"{g.expr}: {g.note}")
        else:
            out.append(f"{g.expr}: observed {g.observed:.4g}, short by {abs(g.margin or 0):.4g}")
    return out
