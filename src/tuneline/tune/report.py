"""A search's results on the console: the trials table, the best trial, parameter importances
(the HTML page's search plots are in :mod:`tuneline.report.plots`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneline.tune.study import MIN_TRIALS_FOR_IMPORTANCE, SearchResult, TrialRow

if TYPE_CHECKING:
    from rich.console import Group, RenderableType


def _v(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _shown_value(t: TrialRow) -> str:
    if t.value is not None:
        return f"{t.value:.4f}"
    if t.validations:
        return f"({t.validations[-1][1]:.4f})"
    return "-"


def search_table(found: SearchResult) -> Group:
    """Rich renderables: trials (params, score, state, validations, duration), best, importances."""
    from rich.console import Group
    from rich.table import Table

    names = list(found.trials[0].params) if found.trials else []
    table = Table(title=f"search {found.study_name}: {found.metric} ({found.direction}), backend {found.backend}")
    table.add_column("trial", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column(found.metric, justify="right")
    table.add_column("state")
    table.add_column("validations", justify="right")
    table.add_column("seconds", justify="right")
    best = found.best.number if found.best else None
    for t in found.trials:
        note = " (default)" if found.default_params and t.params == found.default_params and t.number == min(
            (r.number for r in found.trials if r.params == found.default_params), default=-1) else ""
        retry = f" (retry of {t.retry_of})" if t.retry_of is not None else ""
        attempts = f" ({t.attempts} attempts)" if t.attempts > 1 else ""
        table.add_row(f"{t.number}{' *' if t.number == best else ''}", *(_v(t.params.get(n, "")) for n in names),
                      _shown_value(t), t.state + retry + attempts + note, str(len(t.validations)),
                      f"{t.seconds:.0f}" if t.seconds is not None else "-")
    lines: list[RenderableType] = [table]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(found.counts().items()))
    lines.append(f"{len(found.trials)} trials ({counts}); pruned trials show their last validation in brackets")
    if found.best is not None:
        params = ", ".join(f"{k}={_v(v)}" for k, v in found.best.params.items())
        lines.append(f"best: trial {found.best.number}, {found.metric} {found.best.value:.4f} with {params}")
        default = next((t for t in found.trials if found.default_params and t.params == found.default_params
                        and t.value is not None), None)
        if default is not None and default.value is not None:
            lines.append(f"the spec's own values (trial {default.number}): {found.metric} {default.value:.4f}")
    else:
        lines.append("no trial completed")
    if found.importances:
        lines.append("parameter importances (fANOVA): " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(found.importances.items(), key=lambda kv: -kv[1])))
    else:
        done = sum(1 for t in found.trials if t.state == "complete")
        lines.append(f"parameter importances: not computed from {done} complete trials "
                     f"(needs {MIN_TRIALS_FOR_IMPORTANCE})")
    return Group(*lines)

