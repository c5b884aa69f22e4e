"""Gates: expressions over the candidate, the base, golden sets, forgetting and latency."""

from __future__ import annotations

import pytest

from tuneline.eval.gates import check_gate, describe_failures
from tuneline.eval.results import Estimate, EvalSuite, Forgetting, Latency, SetResult, SystemResult
from tuneline.spec.models import Threshold


def _suite(**kw) -> EvalSuite:
    def system(name: str, acc: float) -> SystemResult:
        return SystemResult(name, name, {"accuracy": Estimate(acc, acc - 0.03, acc + 0.03)}, 0.01)

    test = SetResult("test", "test", 100, [system("base", 0.30), system("candidate", 0.86)])
    golden = SetResult("hard", "golden", 20, [system("base", 0.10), system("candidate", 0.55)], version=1)
    return EvalSuite("s", "classification", "accuracy", "now", [test, golden], **kw)


@pytest.mark.parametrize(("text", "observed", "passed"), [
    ("accuracy >= 0.85", 0.86, True),
    ("accuracy - base.accuracy >= 0.60", 0.56, False),
    ("golden.hard.accuracy >= 0.5", 0.55, True),
    ("golden.hard.accuracy - golden.hard.base.accuracy > 0.5", 0.45, False),
])
def test_gate_values(text: str, observed: float, passed: bool):
    g = check_gate(_suite(), Threshold.parse(text))
    assert g.observed == pytest.approx(observed)
    assert g.passed is passed
    assert g.margin == pytest.approx(observed - g.threshold)


def test_upper_bound_gates_and_their_margin():
    suite = _suite(forgetting=Forgetting(40, Estimate(0.9), Estimate(0.8), drop=0.1),
                   latency=Latency(32, p50_ms=300, p95_ms=900, mean_ms=400, tokens_per_second=20))
    forgetting = check_gate(suite, Threshold.parse("forgetting <= 0.05"))
    assert not forgetting.passed and forgetting.margin == pytest.approx(-0.05)
    latency = check_gate(suite, Threshold.parse("p95_latency_ms <= 800"))
    assert not latency.passed and latency.observed == 900
    lines = describe_failures([forgetting, latency])
    assert lines == ["forgetting <= 0.05: observed 0.1, short by 0.05",
                     "p95_latency_ms <= 800: observed 900, short by 100"]


def test_production_gate_is_skipped_without_a_production_model():
    g = check_gate(_suite(), Threshold.parse("accuracy - production.accuracy >= 0"))
    assert g.passed and g.observed is None and "no production model yet" in g.note


def test_a_gate_on_something_not_measured_fails():
    g = check_gate(_suite(), Threshold.parse("forgetting <= 0.05"))
    assert not g.passed and g.note.startswith("not measured")


def test_expression_parsing_and_rendering():
    t = Threshold.parse("accuracy-base.accuracy>=0.1")
    assert t.terms == [(1, "accuracy"), (-1, "base.accuracy")]
    assert str(t) == "accuracy - base.accuracy >= 0.1"
