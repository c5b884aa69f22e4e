"""The comparison as one table for the console, then the recommendation and its reasons."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneline.compare.results import CompareReport, Measured, human_bytes, human_count

if TYPE_CHECKING:
    from rich.console import Group, RenderableType

COLUMNS = ("option", "[95% interval]", "vs best (p)", "train s", "tok/s", "peak MB", "adapter", "p50 / p95 ms",
           "trainable / total", "licence", "lr")


def row(report: CompareReport, m: Measured, recommended: str = " <- recommended") -> list[str]:
    """One combination's cells, as the console and the report page show them (plain text)."""
    mark = (" (best)" if m.label == report.best else "") + (recommended if m.label == report.recommended else "")
    name = m.label + mark + (" (reused)" if m.reused else "")
    lr = f"{m.lr:.3g} ({m.lr_source})"
    if m.state != "complete":
        return [name, "-", "-", "-", "-", "-", "-", "-", "-", m.license or "not declared", f"{lr}; failed: {m.error}"]
    e = m.metrics.get(report.metric)
    vs = (f"{m.vs_best.value:+.3f} (p={m.p_vs_best:.2g})" if m.vs_best is not None and m.p_vs_best is not None
          and m.label != report.best else "-")
    params = (f"{human_count(m.trainable_params)} / {human_count(m.total_params)}"
              if m.trainable_params is not None and m.total_params is not None else "-")
    return [name, e.fmt() if e else "-", vs, _f(m.train_seconds, "{:.0f}"), _f(m.tokens_per_second, "{:.0f}"),
            _f(m.peak_memory_mb, "{:.0f}") + (" (GPU)" if m.memory_kind == "cuda" else ""),
            human_bytes(m.adapter_bytes) if m.adapter_bytes is not None else "-",
            f"{m.p50_ms:.0f} / {m.p95_ms:.0f}" if m.p50_ms is not None and m.p95_ms is not None else "-",
            params, m.license or "not declared", lr]


def _f(x: float | None, fmt: str) -> str:
    return fmt.format(x) if x is not None else "-"


def headers(report: CompareReport) -> list[str]:
    return [COLUMNS[0], f"{report.metric} {COLUMNS[1]}", *COLUMNS[2:]]


def compare_table(report: CompareReport) -> Group:
    """Rich renderables: the table, then the recommendation and its reasons."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"which model and method? {len(report.combinations)} combinations on the same "
                        f"{report.n} {report.set} items")
    for i, col in enumerate(headers(report)):
        table.add_column(col, justify="left" if i in (0, 9, 10) else "right")
    for m in report.combinations:
        table.add_row(*row(report, m))
    lines: list[RenderableType] = [table]
    if report.recommended:
        lines.append(f"recommendation: {report.recommended}")
    lines += [f"  {r}" for r in report.reasons]
    return Group(*lines)
