"""The page's plots, drawn with matplotlib's object API (no pyplot: no GUI backend, no global
figure registry). matplotlib and numpy are imported inside the functions that use them.

Each ``*_plot`` returns a :class:`~matplotlib.figure.Figure`; :func:`tuneline.report.page.embed`
turns it into an image on the page.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tuneline.eval.results import Confusion, Robustness
from tuneline.tune.study import SearchResult, TrialRow

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

SYSTEM_COLORS = {"base": "#8c8c8c", "candidate": "#1f77b4", "production": "#ff7f0e"}
OTHER_SYSTEM_COLOR = "#9467bd"
OTHER_LABELS = "(other labels)"


def plain(text: str, limit: int = 40) -> str:
    """Label text for matplotlib: shortened, and ``$`` escaped so it is not parsed as math."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


def figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def bar_plot(names: list[str], values: list[float], lows: list[float | None], highs: list[float | None],
             ylabel: str, title: str, colors: list[str] | None = None) -> Figure:
    """One bar per name with its value on top and, where known, the interval as an error bar."""
    fig = figure(max(3.2, 1.1 * len(names) + 1.5), 3.0)
    ax = fig.add_subplot()
    x = list(range(len(names)))
    err_lo = [max(0.0, v - lo) if lo is not None else 0.0 for v, lo in zip(values, lows, strict=True)]
    err_hi = [max(0.0, hi - v) if hi is not None else 0.0 for v, hi in zip(values, highs, strict=True)]
    has_err = any(err_lo) or any(err_hi)
    ax.bar(x, values, color=colors or "#1f77b4", width=0.6,
           yerr=[err_lo, err_hi] if has_err else None, capsize=5, ecolor="#333333")
    for xi, v, hi in zip(x, values, err_hi, strict=True):
        ax.annotate(f"{v:.3f}", (xi, v + hi), xytext=(0, 3), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_xticks(x, [plain(n, 24) for n in names])
    ax.set_ylabel(plain(ylabel))
    ax.set_title(plain(title, 80), fontsize=10)
    top = max([v + h for v, h in zip(values, err_hi, strict=True)] + [0.0])
    ax.set_ylim(min(0.0, min(values, default=0.0)), top * 1.15 if top > 0 else 1.0)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


# --- confusion matrix ----------------------------------------------------------------------------

def confusion_focus(conf: Confusion, top: int) -> tuple[list[int], list[int], int]:
    """Row indices (reference labels) and column indices (predicted) of the labels involved in the
    most confusions, and how many labels had any confusion at all."""
    n_rows = len(conf.matrix)
    row_index = {lab: i for i, lab in enumerate(conf.labels) if i < n_rows}
    col_index = {c: j for j, c in enumerate(conf.columns)}
    involvement: dict[str, int] = {}
    for i, row in enumerate(conf.matrix):
        ref = conf.labels[i] if i < len(conf.labels) else str(i)
        for j, count in enumerate(row):
            pred = conf.columns[j] if j < len(conf.columns) else str(j)
            if count and pred != ref:
                involvement[ref] = involvement.get(ref, 0) + count
                involvement[pred] = involvement.get(pred, 0) + count
    ranked = sorted((lab for lab in conf.labels if involvement.get(lab)), key=lambda lab: (-involvement[lab], lab))
    chosen = ranked[:top] if ranked else list(conf.labels[:top])
    rows = [row_index[lab] for lab in chosen if lab in row_index]
    cols = [col_index[lab] for lab in chosen if lab in col_index]
    extra = [j for j, c in enumerate(conf.columns) if c not in conf.labels
             and any(r[j] for r in conf.matrix if j < len(r))]  # e.g. "(invalid)" when used
    return rows, cols + extra, len(ranked)


def confusion_view(conf: Confusion, rows: list[int], cols: list[int]) -> tuple[list[str], list[str], np.ndarray]:
    """The shown part of the matrix: ``rows`` x ``cols``, plus an "(other labels)" column counting
    the wrong predictions into labels not shown, so that every row still adds up."""
    import numpy as np

    full = np.array([r + [0] * (len(conf.columns) - len(r)) for r in conf.matrix], dtype=float)
    row_labels = [conf.labels[i] for i in rows]
    col_labels = [conf.columns[j] for j in cols]
    m = full[np.ix_(rows, cols)]
    shown = set(cols)
    hidden = [j for j in range(len(conf.columns)) if j not in shown]
    if hidden:
        other = full[np.ix_(rows, hidden)].sum(axis=1, keepdims=True)
        for a, i in enumerate(rows):  # a right answer into a hidden column is not a confusion
            ref = conf.labels[i]
            if ref in conf.columns and conf.columns.index(ref) in hidden:
                other[a, 0] -= full[i, conf.columns.index(ref)]
        if other.any():
            m = np.hstack([m, other])
            col_labels.append(OTHER_LABELS)
    return row_labels, col_labels, m


def confusion_plot(conf: Confusion, rows: list[int], cols: list[int], system: str) -> Figure:
    """Heatmap of the chosen rows and columns: wrong predictions in red, right ones in pale blue."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    row_labels, col_labels, m = confusion_view(conf, rows, cols)
    diag = np.array([[r == c for c in col_labels] for r in row_labels], dtype=bool)
    side = 1.6 + 0.24 * max(len(row_labels), len(col_labels))
    fig = figure(side + 1.2, side)
    ax = fig.add_subplot()
    off = np.ma.masked_where(diag | (m == 0), m)
    on = np.ma.masked_where(~diag, m)
    vmax = max(1.0, float(off.max()) if off.count() else 1.0)
    ax.imshow(np.zeros_like(m), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.imshow(on, cmap="Blues", vmin=0, vmax=float(on.max()) * 2.5 if on.count() else 1.0,
              aspect="auto", interpolation="nearest")
    im = ax.imshow(off, cmap="Reds", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    small = len(row_labels) > 12
    for a in range(m.shape[0]):
        for b in range(m.shape[1]):
            if m[a, b]:
                hot = not diag[a, b] and m[a, b] > 0.6 * vmax
                ax.text(b, a, f"{int(m[a, b])}", ha="center", va="center", fontsize=6 if small else 8,
                        color="white" if hot else "#1f2328")
    ax.set_xticks(range(len(col_labels)), [plain(c, 28) for c in col_labels], rotation=60, ha="right",
                  rotation_mode="anchor", fontsize=6.5 if small else 8)
    ax.set_yticks(range(len(row_labels)), [plain(r, 28) for r in row_labels], fontsize=6.5 if small else 8)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("reference", fontsize=8)
    ax.set_title(f"confusions of {plain(system)} (wrong in red, right in blue)", fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.5)
    bar.set_label("wrong predictions", fontsize=8)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar.ax.tick_params(labelsize=7)
    return fig


# --- robustness, loss ------------------------------------------------------------------------------

def robustness_plot(rob: Robustness) -> Figure:
    names = ["clean", *rob.perturbations]
    values = [rob.clean, *(p.value for p in rob.perturbations.values())]
    colors = ["#1f77b4"] + ["#d62728" if p.drop > 0 else "#2ca02c" for p in rob.perturbations.values()]
    n = len(names)
    return bar_plot(names, values, [None] * n, [None] * n, rob.metric,
                    f"{rob.metric} on {rob.set} under perturbations (n={rob.n})", colors)


def loss_plot(curves: dict[str, list[tuple[int, float]]]) -> Figure:
    """One line per logged loss by step (points when there are few)."""
    fig = figure(7.0, 3.2)
    ax = fig.add_subplot()
    for name, points in curves.items():
        pts = sorted(points)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        if len(pts) == 1:
            ax.plot(xs, ys, "o", label=plain(name))
        else:
            ax.plot(xs, ys, linewidth=1.4, label=plain(name), marker="o" if len(pts) <= 12 else None,
                    markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


# --- hyperparameter search -------------------------------------------------------------------------

def _short(x: object) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def history_plot(found: SearchResult) -> Figure:
    """Each finished trial's score by trial number, and the best so far."""
    fig = figure(6.4, 3.2)
    ax = fig.add_subplot()
    done = [(t.number, t.value) for t in found.trials if t.value is not None]
    pruned = [t for t in found.trials if t.state == "pruned" and t.validations]
    ax.scatter([n for n, _ in done], [v for _, v in done], color="#1f6feb", label="complete", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.validations[-1][1] for t in pruned], color="#9aa4ae",
                   marker="x", label="pruned (last validation)", zorder=3)
    best: float | None = None
    xs, ys = [], []
    for number, value in sorted(done):
        if best is None or (value > best if found.direction == "maximize" else value < best):
            best = value
        xs.append(number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#d1242f", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(found.metric)
    ax.set_title("Optimization history")
    ax.legend(loc="best", fontsize="small")
    return fig


def _parallel_axis(done: list[TrialRow], name: str, metric: str) -> tuple[list[float], list[str]]:
    """One axis of the parallel-coordinates plot: each trial's position in 0..1 (numbers scaled to
    their range, on a log scale when they span more than 20x; categories spread evenly) and the
    axis's two end labels."""
    raw = [t.value if name == metric else t.params[name] for t in done]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        vals = [float(x) for x in raw]  # type: ignore[arg-type]
        logged = min(vals) > 0 and max(vals) / min(vals) > 20
        scaled = [math.log10(v) for v in vals] if logged else vals
        lo, hi = min(scaled), max(scaled)
        return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in scaled], [_short(min(vals)), _short(max(vals))]
    cats = sorted({str(x) for x in raw})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return [pos[str(x)] for x in raw], [cats[0], cats[-1]]


def parallel_plot(found: SearchResult) -> Figure:
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
    cols = [_parallel_axis(done, n, found.metric) for n in axes]
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
