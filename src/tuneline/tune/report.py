"""A search's results for people: the trials table, the best trial, parameter importances, plots."""

from __future__ import annotations

import math
from typing import Any

from tuneline.tune.study import SearchResult, TrialRow


def _v(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _shown_value(t: TrialRow) -> str:
    if t.value is not None:
        return f"{t.value:.4f}"
    if t.validations:
        return f"({t.validations[-1][1]:.4f})"
    return "-"


def search_table(found: SearchResult) -> Any:
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
    lines: list[Any] = [table]
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
        from tuneline.tune.study import MIN_TRIALS_FOR_IMPORTANCE

        done = sum(1 for t in found.trials if t.state == "complete")
        lines.append(f"parameter importances: not computed from {done} complete trials "
                     f"(needs {MIN_TRIALS_FOR_IMPORTANCE})")
    return Group(*lines)


# --- plots for the HTML report ---------------------------------------------------------------------

def history_plot(found: SearchResult, figure: Any) -> Any:
    """Each finished trial's score by trial number, and the best so far."""
    fig = figure(6.4, 3.2)
    ax = fig.add_subplot()
    done = [t for t in found.trials if t.value is not None]
    pruned = [t for t in found.trials if t.state == "pruned" and t.validations]
    ax.scatter([t.number for t in done], [t.value for t in done], color="#1f6feb", label="complete", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.validations[-1][1] for t in pruned], color="#9aa4ae",
                   marker="x", label="pruned (last validation)", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda r: r.number):
        assert t.value is not None
        if best is None or (t.value > best if found.direction == "maximize" else t.value < best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#d1242f", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(found.metric)
    ax.set_title("Optimization history")
    ax.legend(loc="best", fontsize="small")
    return fig


def parallel_plot(found: SearchResult, figure: Any) -> Any:
    """Parallel coordinates: one line per complete trial across the searched parameters (scaled to
    their range; log scale for log-sampled ones), coloured by score."""
    import matplotlib

    done = [t for t in found.trials if t.value is not None]
    names = list(done[0].params) if done else []
    fig = figure(max(4.0, 1.6 * (len(names) + 1)), 3.4)
    ax = fig.add_subplot()
    if not done or not names:
        ax.text(0.5, 0.5, "no complete trials", ha="center")
        return fig
    axes = [*names, found.metric]

    def column(name: str) -> tuple[list[float], list[str]]:
        raw = [t.value if name == found.metric else t.params[name] for t in done]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
            vals = [float(x) for x in raw]  # type: ignore[arg-type]
            logged = min(vals) > 0 and max(vals) / min(vals) > 20
            scaled = [math.log10(v) for v in vals] if logged else vals
            lo, hi = min(scaled), max(scaled)
            return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in scaled], [_v(min(vals)), _v(max(vals))]
        cats = sorted({str(x) for x in raw})
        pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
        return [pos[str(x)] for x in raw], [cats[0], cats[-1]]

    cols = [column(n) for n in axes]
    values = [t.value for t in done]
    lo, hi = min(v for v in values if v is not None), max(v for v in values if v is not None)
    cmap = matplotlib.colormaps["viridis"]
    for i, t in enumerate(done):
        assert t.value is not None
        shade = (t.value - lo) / (hi - lo) if hi > lo else 1.0
        if found.direction == "minimize":
            shade = 1 - shade
        ax.plot(range(len(axes)), [c[0][i] for c in cols], color=cmap(shade), alpha=0.85)
    ax.set_xticks(range(len(axes)), [f"{a}\n{c[1][0]} .. {c[1][1]}" for a, c in zip(axes, cols, strict=True)],
                  fontsize="small")
    ax.set_yticks([])
    for x in range(len(axes)):
        ax.axvline(x, color="#666", linewidth=0.8)
    ax.set_title("Parallel coordinates (colour: better is brighter)")
    return fig
