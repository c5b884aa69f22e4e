"""Forgetting: a probe of general questions answered by the base model and by the candidate."""

from __future__ import annotations

from tuneline.eval.results import Forgetting
from tuneline.report.page import html_table, interval, num, text_cell, verdict_cell

ANCHOR = "forgetting"
NAV = "Forgetting"


def forgetting(f: Forgetting | None) -> str:
    if f is None:
        return ""
    table = html_table(["probe", "n", "base", "candidate", "drop (base - candidate)"],
                       [["general ability", num(f.n), interval(f.base.value, f.base.low, f.base.high),
                         interval(f.candidate.value, f.candidate.low, f.candidate.high), num(f.drop, signed=True)]],
                       num_cols=(1, 2, 3, 4))
    items = ""
    if f.items:
        rows = [[text_cell(i.question), text_cell(i.reference), text_cell(i.base),
                 verdict_cell(i.base_ok, "right", "wrong"), text_cell(i.candidate),
                 verdict_cell(i.candidate_ok, "right", "wrong")]
                for i in f.items]
        changed = sum(i.base_ok != i.candidate_ok for i in f.items)
        items = (f"<details><summary>Probe items ({len(f.items):,}; {changed:,} changed)</summary>"
                 + html_table(["question", "reference", "base", "", "candidate", ""], rows, cls="compact")
                 + "</details>")
    note = '<p class="note">A positive drop means the candidate lost general ability the base model had.</p>'
    return f'<h2 id="{ANCHOR}">Forgetting</h2>{table}{note}{items}'
