"""Should we fine-tune? Every baseline option's quality, cost and latency, and the recommendation."""

from __future__ import annotations

from collections.abc import Mapping

from tuneline.baseline.options import BaselineReport, OptionResult
from tuneline.report.page import embed, esc, html_table, interval, num, p_value
from tuneline.report.plots import bar_plot

ANCHOR = "baselines"
NAV = "Should we fine-tune?"
RECOMMENDED_COLOR = "#2da44e"
OTHER_COLOR = "#1f77b4"


def baselines(raw: Mapping[str, object] | None) -> str:
    """``raw``: a :class:`~tuneline.baseline.options.BaselineReport` as stored in the evaluation."""
    if not raw:
        return ""
    report = BaselineReport.from_dict(dict(raw))
    m = report.metric
    out = (f'<h2 id="{ANCHOR}">Should we fine-tune?</h2><p>Each option on the same {esc(report.set)} split\'s '
           f"{esc(report.items)}, with the same metrics and 95% intervals; the difference to the best option "
           "with its p-value (McNemar for accuracy, else the paired bootstrap).</p>")
    out += html_table(["option", f"{m} [95% interval]", "vs best (p)", "one-off cost", "p50 / p95 ms",
                       "prompt tokens", "what"], [_row(report, o) for o in report.options], cls="compact",
                      num_cols=(1, 2, 3, 4, 5))
    if report.recommended:
        out += (f"<p><strong>Recommendation: {esc(report.recommended)}</strong></p><ul>"
                + "".join(f"<li>{esc(r)}</li>" for r in report.reasons) + "</ul>")
    return out + _plot(report)


def _row(report: BaselineReport, o: OptionResult) -> list[str]:
    tag = (" (best)" if o.name == report.best else "") + (" (recommended)" if o.name == report.recommended else "")
    if o.skipped:
        return [esc(o.name), "-", "-", "-", "-", "-", esc(f"skipped: {o.skipped}")]
    e = o.metrics.get(report.metric)
    vs = (f"{num(o.vs_best.value, 3, signed=True)} ({p_value(o.p_vs_best)})"
          if o.vs_best is not None and o.name != report.best else "-")
    return [esc(o.name + tag), interval(e.value, e.low, e.high) if e else "-", vs,
            f"{o.one_off_seconds:.0f} s",
            f"{o.p50_ms:.0f} / {o.p95_ms:.0f}" if o.p50_ms is not None and o.p95_ms is not None else "-",
            f"{o.prompt_tokens:.0f}" if o.prompt_tokens is not None else "-", esc(o.description)]


def _plot(report: BaselineReport) -> str:
    """The measured options' primary metric with intervals, the recommended one in green."""
    m = report.metric
    measured = [(o, e) for o in report.options if not o.skipped and (e := o.metrics.get(m))]
    if not measured:
        return ""
    fig = bar_plot([o.name for o, _ in measured], [e.value for _, e in measured], [e.low for _, e in measured],
                   [e.high for _, e in measured], m, f"{m} by option (green: recommended)",
                   [RECOMMENDED_COLOR if o.name == report.recommended else OTHER_COLOR for o, _ in measured])
    return embed(fig, f"{m} by option")
