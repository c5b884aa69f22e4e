"""The hyperparameter search: every trial, the best one, parameter importances, the optimization
history and a parallel-coordinates plot."""

from __future__ import annotations

from tuneline.report.page import embed, esc, html_table, num
from tuneline.report.plots import history_plot, parallel_plot
from tuneline.tune.study import SearchResult, TrialRow

ANCHOR = "search"
NAV = "Search"


def search(found: SearchResult | None) -> str:
    if found is None:
        return ""
    names = list(found.trials[0].params) if found.trials else []
    best = found.best.number if found.best else None
    rows = [_row(t, names, best) for t in found.trials]
    out = (f'<h2 id="{ANCHOR}">Hyperparameter search</h2><p>study <code>{esc(found.study_name)}</code>, backend '
           f"{esc(found.backend)}, {len(found.trials)} trials; objective: validation {esc(found.metric)} "
           f"({esc(found.direction)}). Pruned trials show their last validation in brackets.</p>")
    if found.best is not None:
        params = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in found.best.params.items())
        out += (f"<p><strong>Best: trial {found.best.number}</strong>, {esc(found.metric)} "
                f"{num(found.best.value, 4)}, with {esc(params)}.</p>")
    out += html_table(["trial", *names, found.metric, "state", "validations", "seconds"], rows, cls="compact",
                      num_cols=tuple(range(1, len(names) + 2)))
    if found.importances:
        out += "<h3>Parameter importances</h3>" + html_table(
            ["parameter", "importance"], [[esc(k), num(v, 2)] for k, v in
                                          sorted(found.importances.items(), key=lambda kv: -kv[1])],
            cls="compact", num_cols=(1,))
    out += embed(history_plot(found), "optimization history",
                 "Each trial's validation score; the line is the best so far.")
    out += embed(parallel_plot(found), "parallel coordinates",
                 "Complete trials across the searched parameters, coloured by score.")
    return out


def _row(t: TrialRow, names: list[str], best: int | None) -> list[str]:
    """Trial number, its parameters, its score (pruned: the last validation in brackets), state."""
    value = (num(t.value, 4) if t.value is not None
             else (f"({num(t.validations[-1][1], 4)})" if t.validations else "-"))
    state = t.state + (f" (retry of {t.retry_of})" if t.retry_of is not None else "") + (
        f" ({t.attempts} attempts)" if t.attempts > 1 else "")
    return [f"{t.number}{' (best)' if t.number == best else ''}",
            *(esc(f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else t.params.get(n, ""))
              for n in names),
            value, esc(state), str(len(t.validations)), num(t.seconds, 0) if t.seconds is not None else "-"]
