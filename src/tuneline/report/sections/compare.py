"""Which base model and method? Every combination `tuneline compare` measured on the same test
items: quality with intervals, the paired test against the best, costs, and the recommendation."""

from __future__ import annotations

from collections.abc import Mapping

from tuneline.compare.results import CompareReport
from tuneline.compare.table import headers, row
from tuneline.report.page import embed, esc, html_table
from tuneline.report.plots import bar_plot
from tuneline.report.sections.baselines import OTHER_COLOR, RECOMMENDED_COLOR

ANCHOR = "compare"
NAV = "Compare"


def compare(raw: Mapping[str, object] | None) -> str:
    """``raw``: a :class:`~tuneline.compare.results.CompareReport` as stored (``compare/compare.json``)."""
    if not raw:
        return ""
    report = CompareReport.from_dict(dict(raw))
    out = (f'<h2 id="{ANCHOR}">Which model and method?</h2><p>{len(report.combinations)} combinations trained on '
           f"the same data (dataset {esc(report.dataset_version or 'not versioned')}) and scored on the same "
           f"{report.n} {esc(report.set)} items, with 95% intervals; the difference to the best with its p-value "
           "(McNemar for accuracy, else the paired bootstrap). Latency: single requests (batch 1) as served; "
           "peak memory: training; adapter: its weight files on disk.</p>")
    out += html_table(headers(report), [[esc(cell) for cell in row(report, m, " (recommended)")]
                                        for m in report.combinations],
                      cls="compact", num_cols=tuple(range(1, 9)))
    if report.recommended:
        out += (f"<p><strong>Recommendation: {esc(report.recommended)}</strong></p><ul>"
                + "".join(f"<li>{esc(r)}</li>" for r in report.reasons) + "</ul>")
    return out + _plot(report)


def _plot(report: CompareReport) -> str:
    """Each measured combination's primary metric with its interval, the recommended one in green."""
    m = report.metric
    measured = [(c, e) for c in report.combinations if c.state == "complete" and (e := c.metrics.get(m))]
    if not measured:
        return ""
    fig = bar_plot([c.label for c, _ in measured], [e.value for _, e in measured], [e.low for _, e in measured],
                   [e.high for _, e in measured], m, f"{m} by combination (green: recommended)",
                   [RECOMMENDED_COLOR if c.label == report.recommended else OTHER_COLOR for c, _ in measured])
    return embed(fig, f"{m} by combination")
