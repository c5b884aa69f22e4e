"""Gates: each release condition with what was observed, the threshold, the margin and the verdict."""

from __future__ import annotations

from tuneline.eval.results import GateResult
from tuneline.report.page import esc, html_table, num, text_cell, verdict_cell

ANCHOR = "gates"
NAV = "Gates"


def gates(results: list[GateResult]) -> str:
    if not results:
        return f'<h2 id="{ANCHOR}">Gates</h2><p class="muted">No gates were defined for this run.</p>'
    rows = [[esc(g.expr), num(g.observed), num(g.threshold), num(g.margin, signed=True),
             verdict_cell(g.passed, "pass", "FAIL"), text_cell(g.note)] for g in results]
    table = html_table(["gate", "observed", "threshold", "margin", "result", "note"], rows, num_cols=(1, 2, 3))
    return f'<h2 id="{ANCHOR}">Gates</h2>{table}'
