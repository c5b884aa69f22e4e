"""The baseline table for the console."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneline.baseline.options import BaselineReport

if TYPE_CHECKING:
    from rich.console import Group, RenderableType


def baseline_table(report: BaselineReport) -> Group:
    """Rich renderables: every option with quality [interval], difference to the best (p), costs,
    then the recommendation and its reasons."""
    from rich.console import Group
    from rich.table import Table

    m = report.metric
    table = Table(title=f"should we fine-tune? options on the {report.set} split ({report.items})")
    for col, right in (("option", False), (f"{m} [95% interval]", True), ("vs best (p)", True),
                       ("one-off cost", True), ("p50 / p95 ms", True), ("prompt tokens", True), ("what", False)):
        table.add_column(col, justify="right" if right else "left")
    for o in report.options:
        mark = (" (best)" if o.name == report.best else "") + (" <- recommended" if o.name == report.recommended else "")
        if o.skipped:
            table.add_row(o.name, "-", "-", "-", "-", "-", f"skipped: {o.skipped}")
            continue
        e = o.metrics.get(m)
        quality = f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" if e else "-"
        vs = (f"{o.vs_best.value:+.3f} (p={o.p_vs_best:.2g})" if o.vs_best is not None and o.p_vs_best is not None
              and o.name != report.best else "-")
        lat = f"{o.p50_ms:.0f} / {o.p95_ms:.0f}" if o.p50_ms is not None and o.p95_ms is not None else "-"
        toks = f"{o.prompt_tokens:.0f}" if o.prompt_tokens is not None else "-"
        table.add_row(o.name + mark, quality, vs, f"{o.one_off_seconds:.0f} s", lat, toks, o.description)
    lines: list[RenderableType] = [table]
    if report.recommended:
        lines.append(f"recommendation: {report.recommended}")
    lines += [f"  {r}" for r in report.reasons]
    return Group(*lines)
