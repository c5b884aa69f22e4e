"""The top of the page: title, verdict badge, the run's facts, and the one-line headline."""

from __future__ import annotations

from tuneline.eval.results import EvalSuite
from tuneline.report.page import esc, interval, kv_table


def header(suite: EvalSuite, title: str, run_info: dict[str, str]) -> str:
    """Title, PASSED/FAILED/NO GATES badge with the gate count, spec/task/metric and ``run_info``."""
    passed = suite.passed
    if suite.gates:
        badge = f'<span class="badge {"pass" if passed else "fail"}">{"PASSED" if passed else "FAILED"}</span>'
    else:
        badge = '<span class="badge skip">NO GATES</span>'
    pairs = [("spec", esc(suite.spec)), ("task", esc(suite.task)), ("primary metric", esc(suite.primary)),
             ("evaluated", esc(suite.created))]
    pairs += [(k, esc(v)) for k, v in run_info.items()]
    gates = f"{sum(g.passed for g in suite.gates)} of {len(suite.gates)} gates passed" if suite.gates else ""
    return (f"<header><h1>{esc(title)}</h1><p>{badge} <span class=muted>{esc(gates)}</span></p>"
            f"{kv_table(pairs)}</header>")


def headline(suite: EvalSuite) -> str:
    """The primary metric of each system on the main set, the one line a reader wants first."""
    if not suite.sets:
        return ""
    main = suite.main_set()
    parts = []
    for s in main.systems:
        est = s.metrics.get(suite.primary)
        if est is not None:
            parts.append(f"<b>{esc(s.name)}</b> {esc(suite.primary)} {interval(est.value, est.low, est.high)}")
    if not parts:
        return ""
    return f"<p>On <b>{esc(main.name)}</b> (n={main.n:,}): " + "; ".join(parts) + ".</p>"
