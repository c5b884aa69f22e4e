"""Robustness: the primary metric on clean inputs and under each perturbation (typos, case, ...)."""

from __future__ import annotations

from tuneline.eval.results import Robustness
from tuneline.report.page import embed, esc, html_table, num
from tuneline.report.plots import robustness_plot

ANCHOR = "robustness"
NAV = "Robustness"


def robustness(r: Robustness | None) -> str:
    if r is None:
        return ""
    rows = [["clean", num(r.clean), "-"]]
    rows += [[esc(name), num(p.value), num(p.drop, signed=True)] for name, p in r.perturbations.items()]
    table = html_table(["input", r.metric, "drop (clean - perturbed)"], rows, num_cols=(1, 2))
    head = f'<p>{esc(r.metric)} on <b>{esc(r.set)}</b> (n={r.n:,}); worst drop {num(r.worst_drop, signed=True)}.</p>'
    plot = embed(robustness_plot(r), "robustness")
    return f'<h2 id="{ANCHOR}">Robustness</h2>{head}<div class="row">{table}{plot}</div>'
