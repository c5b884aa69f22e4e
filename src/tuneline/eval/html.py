"""``tuneline report``: one self-contained HTML page per evaluated run.

The page needs nothing but a browser: no scripts, no web fonts, no external URLs. Styles are
inline and every plot is a matplotlib SVG embedded as a ``data:`` URI (fonts drawn as paths, so
it looks the same everywhere). All user text (inputs, labels, answers, the spec) is escaped.

:func:`render_html` turns an :class:`~tuneline.eval.results.EvalSuite` into the page;
:func:`write_report` finds a tracked MLflow run by id (or a unique prefix), loads what the run
logged (``eval/report.json``, the spec, the dataset manifest, the loss histories) and writes it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.errors import Problem, TunelineError
from tuneline.eval.results import (
    FLIP_MEANINGS,
    SYSTEMS,
    Comparison,
    Confusion,
    EvalSuite,
    Flip,
    Forgetting,
    GateResult,
    Latency,
    Robustness,
    SetResult,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_FLIPS_SHOWN = 50  # per list (fixed / broken)
CONFUSION_TOP = 20  # labels shown in the confusion heatmap
MIN_PREFIX = 6  # shortest run id prefix accepted
LOSS_METRICS = ("train_loss", "eval_loss")

_COLORS = {"base": "#8c8c8c", "candidate": "#1f77b4", "production": "#ff7f0e"}

_CSS = """
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 0 auto; padding: 24px 32px 64px; max-width: 1200px; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 6px; }
nav { margin: 12px 0 4px; color: var(--muted); }
nav a { margin-right: 12px; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.text { max-width: 380px; overflow-wrap: anywhere; white-space: pre-wrap; }
table.compact td, table.compact th { padding: 2px 6px; font-size: 12.5px; }
table.kv th { width: 180px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff; font-weight: 600; }
.pass { background: var(--ok); } .fail { background: var(--bad); } .skip { background: var(--muted); }
td.ok { color: var(--ok); font-weight: 600; } td.bad { color: var(--bad); font-weight: 600; }
.muted, .note { color: var(--muted); }
.note { font-size: 12.5px; margin: 2px 0 8px; }
details { margin: 6px 0 10px; }
summary { cursor: pointer; font-weight: 600; }
pre { background: var(--bg); border: 1px solid var(--line); padding: 10px 12px; overflow-x: auto;
      font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
figure { margin: 8px 0 14px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12.5px; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
"""


# --- formatting helpers ------------------------------------------------------------------------

def _e(x: object) -> str:
    return escape("" if x is None else str(x), quote=True)


def _num(x: float | int | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:+,d}" if signed else f"{x:,d}"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _interval(value: float | None, low: float | None, high: float | None, digits: int = 3,
              signed: bool = False) -> str:
    text = _num(value, digits, signed)
    if low is None or high is None:
        return text
    return f"{text} [{_num(low, digits, signed)}, {_num(high, digits, signed)}]"


def _p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "",
           num_cols: Iterable[int] = ()) -> str:
    """``headers`` are plain text (escaped here); ``rows`` cells are HTML, already escaped."""
    nums = set(num_cols)
    head = "".join(f'<th{" class=num" if i in nums else ""}>{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if cell.startswith("<td"):
                cells.append(cell)
            else:
                cells.append(f'<td{" class=num" if i in nums else ""}>{cell}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls_attr = f' class="{cls}"' if cls else ""
    return f"<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(pairs: Iterable[tuple[str, str]]) -> str:
    """Key/value table; values are HTML, already escaped."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _text_cell(x: object) -> str:
    return f'<td class="text">{_e(x)}</td>'


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


# --- plots ---------------------------------------------------------------------------------------

def _plain(text: str, limit: int = 40) -> str:
    """Label text for matplotlib: shortened, and ``$`` escaped so it is not parsed as math."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


def _figure(width: float, height: float) -> Figure:
    # the object API, not pyplot: no GUI backend, no global figure registry
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _embed(fig: Figure, alt: str, caption: str = "") -> str:
    import matplotlib

    buf = io.BytesIO()
    # fixed salt and no date: the same suite renders to the same bytes
    with matplotlib.rc_context({"svg.hashsalt": "tuneline", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><img class="plot" alt="{_e(alt)}" src="data:image/svg+xml;base64,{data}">'
            f"{cap}</figure>")


def _bar_plot(names: list[str], values: list[float], lows: list[float | None], highs: list[float | None],
              ylabel: str, title: str, colors: list[str] | None = None) -> Figure:
    fig = _figure(max(3.2, 1.1 * len(names) + 1.5), 3.0)
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
    ax.set_xticks(x, [_plain(n, 24) for n in names])
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title, 80), fontsize=10)
    top = max([v + h for v, h in zip(values, err_hi, strict=True)] + [0.0])
    ax.set_ylim(min(0.0, min(values, default=0.0)), top * 1.15 if top > 0 else 1.0)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _confusion_focus(conf: Confusion, top: int) -> tuple[list[int], list[int], int]:
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


def _confusion_view(conf: Confusion, rows: list[int], cols: list[int]) -> tuple[list[str], list[str], Any]:
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
            col_labels.append("(other labels)")
    return row_labels, col_labels, m


def _confusion_plot(conf: Confusion, rows: list[int], cols: list[int], system: str) -> Figure:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    row_labels, col_labels, m = _confusion_view(conf, rows, cols)
    diag = np.array([[r == c for c in col_labels] for r in row_labels], dtype=bool)
    side = 1.6 + 0.24 * max(len(row_labels), len(col_labels))
    fig = _figure(side + 1.2, side)
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
    ax.set_xticks(range(len(col_labels)), [_plain(c, 28) for c in col_labels], rotation=60, ha="right",
                  rotation_mode="anchor", fontsize=6.5 if small else 8)
    ax.set_yticks(range(len(row_labels)), [_plain(r, 28) for r in row_labels], fontsize=6.5 if small else 8)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("reference", fontsize=8)
    ax.set_title(f"confusions of {_plain(system)} (wrong in red, right in blue)", fontsize=9)
    bar = fig.colorbar(im, ax=ax, shrink=0.5)
    bar.set_label("wrong predictions", fontsize=8)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar.ax.tick_params(labelsize=7)
    return fig


def _robustness_plot(rob: Robustness) -> Figure:
    names = ["clean", *rob.perturbations]
    values = [rob.clean, *(p.value for p in rob.perturbations.values())]
    colors = ["#1f77b4"] + ["#d62728" if p.drop > 0 else "#2ca02c" for p in rob.perturbations.values()]
    n = len(names)
    return _bar_plot(names, values, [None] * n, [None] * n, rob.metric,
                     f"{rob.metric} on {rob.set} under perturbations (n={rob.n})", colors)


def _loss_plot(curves: dict[str, list[tuple[int, float]]]) -> Figure:
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    for name, points in curves.items():
        pts = sorted(points)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        if len(pts) == 1:
            ax.plot(xs, ys, "o", label=_plain(name))
        else:
            ax.plot(xs, ys, linewidth=1.4, label=_plain(name), marker="o" if len(pts) <= 12 else None,
                    markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


# --- sections ------------------------------------------------------------------------------------

def _header(suite: EvalSuite, title: str, run_info: dict[str, str]) -> str:
    passed = suite.passed
    if suite.gates:
        badge = f'<span class="badge {"pass" if passed else "fail"}">{"PASSED" if passed else "FAILED"}</span>'
    else:
        badge = '<span class="badge skip">NO GATES</span>'
    pairs = [("spec", _e(suite.spec)), ("task", _e(suite.task)), ("primary metric", _e(suite.primary)),
             ("evaluated", _e(suite.created))]
    pairs += [(k, _e(v)) for k, v in run_info.items()]
    gates = f"{sum(g.passed for g in suite.gates)} of {len(suite.gates)} gates passed" if suite.gates else ""
    return (f"<header><h1>{_e(title)}</h1><p>{badge} <span class=muted>{_e(gates)}</span></p>"
            f"{_kv(pairs)}</header>")


def _headline(suite: EvalSuite) -> str:
    """The primary metric of each system on the main set, the one line a reader wants first."""
    if not suite.sets:
        return ""
    main = suite.main_set()
    parts = []
    for s in main.systems:
        est = s.metrics.get(suite.primary)
        if est is not None:
            parts.append(f"<b>{_e(s.name)}</b> {_e(suite.primary)} {_interval(est.value, est.low, est.high)}")
    if not parts:
        return ""
    return f"<p>On <b>{_e(main.name)}</b> (n={main.n:,}): " + "; ".join(parts) + ".</p>"


def _gates(gates: list[GateResult]) -> str:
    if not gates:
        return '<h2 id="gates">Gates</h2><p class="muted">No gates were defined for this run.</p>'
    rows = []
    for g in gates:
        verdict = '<td class="ok">pass</td>' if g.passed else '<td class="bad">FAIL</td>'
        rows.append([_e(g.expr), _num(g.observed), _num(g.threshold), _num(g.margin, signed=True), verdict,
                     _text_cell(g.note)])
    table = _table(["gate", "observed", "threshold", "margin", "result", "note"], rows, num_cols=(1, 2, 3))
    return f'<h2 id="gates">Gates</h2>{table}'


def _ordered_systems(st: SetResult) -> list[str]:
    names = [s.name for s in st.systems]
    return [n for n in SYSTEMS if n in names] + [n for n in names if n not in SYSTEMS]


def _metric_table(st: SetResult, primary: str) -> str:
    systems = [st.system(n) for n in _ordered_systems(st)]
    present = [s for s in systems if s is not None]
    metrics: list[str] = []
    for s in present:
        for k in s.metrics:
            if k not in metrics:
                metrics.append(k)
    if primary in metrics:
        metrics.remove(primary)
        metrics.insert(0, primary)
    rows = []
    for k in metrics:
        cells = [f"<b>{_e(k)}</b>" if k == primary else _e(k)]
        for s in present:
            est = s.metrics.get(k)
            cells.append("-" if est is None else _interval(est.value, est.low, est.high))
        rows.append(cells)
    rows.append(["model"] + [f'<td class="text">{_e(s.model)}</td>' for s in present])
    rows.append(["seconds per example"] + [_num(s.seconds_per_example) for s in present])
    cols = range(1, len(present) + 1)
    note = '<p class="note">value [low, high]: 95% bootstrap interval.</p>'
    return _table(["metric", *[s.name for s in present]], rows, num_cols=cols) + note


def _comparisons(comps: list[Comparison]) -> str:
    if not comps:
        return ""
    rows = []
    for c in comps:
        sig = '<td class="ok">yes</td>' if c.significant else "<td>no</td>"
        disc = "-" if c.a_only is None or c.b_only is None else f"{c.a_only:,} / {c.b_only:,}"
        rows.append([f"{_e(c.a)} vs {_e(c.b)}", _e(c.metric),
                     _interval(c.diff.value, c.diff.low, c.diff.high, signed=True), _p(c.p_value),
                     _e(c.test), sig, disc])
    table = _table(["comparison", "metric", "difference (a - b)", "p-value", "test", "significant",
                    "only a right / only b right"], rows, num_cols=(2, 3, 6))
    return f"<h3>Paired comparisons</h3>{table}"


def _primary_plot(st: SetResult, primary: str) -> str:
    names, values, lows, highs, colors = [], [], [], [], []
    for name in _ordered_systems(st):
        s = st.system(name)
        est = s.metrics.get(primary) if s else None
        if est is None or est.value is None or (isinstance(est.value, float) and math.isnan(est.value)):
            continue
        names.append(name)
        values.append(est.value)
        lows.append(est.low)
        highs.append(est.high)
        colors.append(_COLORS.get(name, "#9467bd"))
    if not names:
        return ""
    fig = _bar_plot(names, values, lows, highs, primary, f"{primary} on {st.name} (n={st.n:,})", colors)
    return _embed(fig, f"{primary} per system on {st.name}", "Error bars: 95% bootstrap interval.")


def _per_class(st: SetResult) -> str:
    present = [s for s in (st.system(n) for n in _ordered_systems(st)) if s is not None and s.per_class]
    if not present:
        return ""
    labels = sorted({lab for s in present for lab in s.per_class})
    focus = next((s for s in present if s.name == "candidate"), present[-1])
    base = next((s for s in present if s.name == "base" and s is not focus), None)

    def f1(s: Any, lab: str) -> float | None:
        v = s.per_class.get(lab, {}).get("f1")
        return None if v is None else float(v)

    labels.sort(key=lambda lab: (f1(focus, lab) if f1(focus, lab) is not None else -1.0, lab))
    rows = []
    for lab in labels:
        support = next((s.per_class[lab].get("support") for s in present if lab in s.per_class), None)
        cells = [_e(lab), _num(int(support)) if support is not None else "-"]
        cells += [_num(f1(s, lab)) for s in present]
        if base is not None:
            a, b = f1(focus, lab), f1(base, lab)
            cells.append(_num(a - b, signed=True) if a is not None and b is not None else "-")
        p = focus.per_class.get(lab, {})
        cells += [_num(p.get("precision")), _num(p.get("recall"))]
        rows.append(cells)
    headers = ["label", "support", *[f"F1 {s.name}" for s in present]]
    if base is not None:
        headers.append(f"F1 {focus.name} - base")
    headers += [f"precision {focus.name}", f"recall {focus.name}"]
    table = _table(headers, rows, cls="compact", num_cols=range(1, len(headers)))
    return (f"<details><summary>Per-class scores ({len(labels)} labels, worst {_e(focus.name)} F1 first)"
            f"</summary>{table}</details>")


def _confusion(st: SetResult) -> str:
    order = ["candidate", "production", "base"]
    present = [s for s in (st.system(n) for n in order) if s is not None and s.confusion is not None]
    if not present:
        return ""
    s = present[0]
    conf = s.confusion
    assert conf is not None
    rows, cols, n_confused = _confusion_focus(conf, CONFUSION_TOP)
    if not rows or not cols:
        return ""
    shown = len(rows)
    if n_confused > shown:
        what = (f"The {shown} labels (of {len(conf.labels)}) involved in the most confusions of "
                f"{s.name}; the other labels are left out (wrong predictions into them: the last column).")
    elif n_confused:
        what = f"Every label with a confusion ({n_confused} of {len(conf.labels)})."
    else:
        what = f"No confusions: the first {shown} labels of {len(conf.labels)}."
    fig = _confusion_plot(conf, rows, cols, s.name)
    pairs = []
    for i, row in enumerate(conf.matrix):
        for j, count in enumerate(row):
            if count and i < len(conf.labels) and j < len(conf.columns) and conf.labels[i] != conf.columns[j]:
                pairs.append((count, conf.labels[i], conf.columns[j]))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    top_pairs = ""
    if pairs:
        table = _table(["reference", "predicted", "count"],
                       [[_e(r), _e(p), _num(c)] for c, r, p in pairs[:15]], cls="compact", num_cols=(2,))
        top_pairs = (f"<details><summary>Most frequent confusions of {_e(s.name)} "
                     f"({min(15, len(pairs))} of {len(pairs)} pairs)</summary>{table}</details>")
    return f"<h3>Confusion matrix ({_e(s.name)})</h3>{_embed(fig, f'confusion matrix of {s.name}', what)}{top_pairs}"


def _flip_table(flips: list[Flip], st: SetResult | None = None) -> str:
    """The flips' items: input, reference (multi-reference items: the one closest to the later
    answer, all of them folded out), both answers, where; generation tasks also the change of the
    item's primary score."""
    if not any(f.n_references > 1 for f in flips):
        headers = ["#", "input", "reference", "before", "after", "where"]
        rows = [[_num(f.index), _text_cell(f.input), _text_cell(f.reference), _text_cell(f.before),
                 _text_cell(f.after), _text_cell(f.where)] for f in flips]
    else:
        headers = ["#", "input", "closest reference to after", "before", "after", "where"]
        every = st.all_references() if st is not None else []
        rows = []
        for f in flips:
            closest = f.closest_reference if f.closest_reference is not None else f.reference
            refs = every[f.index] if 0 <= f.index < len(every) else [closest]
            listed = "".join(f"<li>{_e(r)}</li>" for r in refs)
            cell = (f'<td class="text">{_e(closest)}<details><summary>all {len(refs)} references</summary>'
                    f"<ol>{listed}</ol></details></td>") if len(refs) > 1 else _text_cell(closest)
            rows.append([_num(f.index), _text_cell(f.input), cell, _text_cell(f.before), _text_cell(f.after),
                         _text_cell(f.where)])
    num_cols: tuple[int, ...] = (0,)
    if any(f.delta is not None for f in flips):
        headers.append("change")
        num_cols = (0, len(headers) - 1)
        for row, f in zip(rows, flips, strict=True):
            row.append(f"{f.delta:+.3f}" if f.delta is not None else "")
    return _table(headers, rows, cls="compact", num_cols=num_cols)


def _flips(st: SetResult, primary: str = "") -> str:
    if not st.flips:
        return ""
    parts = ["<h3>Flips</h3>"]
    for key, flips in st.flips.items():
        later, _, earlier = key.partition("_vs_")
        title = f"{later} vs {earlier}" if earlier else key
        kinds = ("improved", "worsened") if any(f.delta is not None for f in flips) else ("fixed", "broken")
        for kind in kinds:
            meaning = FLIP_MEANINGS[kind].format(later=later, earlier=earlier or "before", primary=primary or "score")
            items = [f for f in flips if f.kind == kind]
            shown = items[:MAX_FLIPS_SHOWN]
            count = f"{len(items):,}" if len(items) == len(shown) else f"{len(items):,}, showing the first {len(shown)}"
            summary = f"{title}: {kind} ({count}) - {meaning}"
            body = _flip_table(shown, st) if shown else '<p class="muted">none</p>'
            parts.append(f"<details><summary>{_e(summary)}</summary>{body}</details>")
    return "".join(parts)


def _set_section(st: SetResult, primary: str) -> str:
    counts = st.reference_counts()
    if counts and max(counts) > 1:
        low, median, high = min(counts), statistics.median(counts), max(counts)
        meta = [("kind", _e(st.kind)), ("items", _num(st.n)),
                ("references per item", f"{low} / {median:g} / {high} (min / median / max; "
                                        f"{sum(counts):,} references in all)")]
    else:
        meta = [("kind", _e(st.kind)), ("rows", _num(st.n))]
    if st.version is not None:
        meta.append(("version", _num(st.version)))
    if st.sha256:
        meta.append(("sha256", f"<code>{_e(st.sha256)}</code>"))
    if st.path:
        meta.append(("path", f"<code>{_e(st.path)}</code>"))
    return "".join([
        f'<h2 id="set-{_slug(st.name)}">Evaluation set: {_e(st.name)}</h2>',
        _kv(meta),
        "<h3>Metrics</h3>",
        _metric_table(st, primary),
        _primary_plot(st, primary),
        _comparisons(st.comparisons),
        _per_class(st),
        _confusion(st),
        _flips(st, primary),
    ])


def _forgetting(f: Forgetting | None) -> str:
    if f is None:
        return ""
    table = _table(["probe", "n", "base", "candidate", "drop (base - candidate)"],
                   [["general ability", _num(f.n), _interval(f.base.value, f.base.low, f.base.high),
                     _interval(f.candidate.value, f.candidate.low, f.candidate.high), _num(f.drop, signed=True)]],
                   num_cols=(1, 2, 3, 4))
    items = ""
    if f.items:
        rows = [[_text_cell(i.question), _text_cell(i.reference), _text_cell(i.base),
                 '<td class="ok">right</td>' if i.base_ok else '<td class="bad">wrong</td>',
                 _text_cell(i.candidate),
                 '<td class="ok">right</td>' if i.candidate_ok else '<td class="bad">wrong</td>']
                for i in f.items]
        changed = sum(i.base_ok != i.candidate_ok for i in f.items)
        items = (f"<details><summary>Probe items ({len(f.items):,}; {changed:,} changed)</summary>"
                 + _table(["question", "reference", "base", "", "candidate", ""], rows, cls="compact")
                 + "</details>")
    note = '<p class="note">A positive drop means the candidate lost general ability the base model had.</p>'
    return f'<h2 id="forgetting">Forgetting</h2>{table}{note}{items}'


def _robustness(r: Robustness | None) -> str:
    if r is None:
        return ""
    rows = [["clean", _num(r.clean), "-"]]
    rows += [[_e(name), _num(p.value), _num(p.drop, signed=True)] for name, p in r.perturbations.items()]
    table = _table(["input", r.metric, "drop (clean - perturbed)"], rows, num_cols=(1, 2))
    head = f'<p>{_e(r.metric)} on <b>{_e(r.set)}</b> (n={r.n:,}); worst drop {_num(r.worst_drop, signed=True)}.</p>'
    return f'<h2 id="robustness">Robustness</h2>{head}<div class="row">{table}{_embed(_robustness_plot(r), "robustness")}</div>'


def _latency(lat: Latency | None) -> str:
    if lat is None:
        return ""
    table = _table(["requests", "p50 ms", "p95 ms", "mean ms", "tokens/s"],
                   [[_num(lat.n), _num(lat.p50_ms, 1), _num(lat.p95_ms, 1), _num(lat.mean_ms, 1),
                     _num(lat.tokens_per_second, 1)]], num_cols=range(5))
    return (f'<h2 id="latency">Latency</h2>{table}'
            '<p class="note">One request at a time (batch 1), as a server answers a single client.</p>')


def _human(h: dict[str, Any] | None) -> str:
    if not h:
        return ""
    pairs: list[tuple[str, str]] = []
    if "against" in h:
        pairs.append(("against", _e(h["against"])))
    if "n" in h:
        pairs.append(("judged items", _e(h["n"])))
    if "win_rate" in h:
        pairs.append(("win rate", _interval(h.get("win_rate"), h.get("low"), h.get("high"))))
    wlt = [f"{k} {_e(h[k])}" for k in ("wins", "losses", "ties") if k in h]
    if wlt:
        pairs.append(("wins / losses / ties", ", ".join(wlt)))
    known = {"against", "n", "win_rate", "low", "high", "wins", "losses", "ties"}
    for k, v in h.items():
        if k not in known:
            pairs.append((str(k), _e(v if isinstance(v, str) else json.dumps(v, default=str))))
    return f'<h2 id="human">Human evaluation</h2>{_kv(pairs)}'


def _losses(curves: dict[str, list[tuple[int, float]]]) -> str:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return '<h2 id="loss">Loss</h2><p class="muted">No loss history was recorded for this run.</p>'
    last = ", ".join(f"{_e(k)} {_num(sorted(v)[-1][1], 4)} at step {sorted(v)[-1][0]:,}" for k, v in curves.items())
    return f'<h2 id="loss">Loss</h2>{_embed(_loss_plot(curves), "loss curves")}<p class="note">Last: {last}.</p>'


def _dataset(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    pairs: list[tuple[str, str]] = []
    for key, label in (("id", "version"), ("spec", "spec"), ("created", "created")):
        if m.get(key) is not None:
            pairs.append((label, _e(m[key])))
    counts = m.get("counts")
    if isinstance(counts, dict) and counts:
        pairs.append(("rows per split", ", ".join(f"{_e(k)} {_num(v) if isinstance(v, int) else _e(v)}"
                                                  for k, v in counts.items())))
    if m.get("rejected") is not None:
        pairs.append(("rejected rows", _e(m["rejected"])))
    labels = m.get("labels")
    if isinstance(labels, list) and labels:
        pairs.append(("labels", _num(len(labels))))
    sources = m.get("sources")
    if isinstance(sources, list) and sources:
        pairs.append(("sources", "<br>".join(
            f"{_e(s.get('split', '?'))}: <code>{_e(s.get('path', '?'))}</code> "
            f"<span class=muted>{_e(str(s.get('sha256', ''))[:16])}</span>"
            for s in sources if isinstance(s, dict))))
    out = f'<h2 id="data">Data version</h2>{_kv(pairs)}'
    dropped = m.get("dropped_by_reason")
    if isinstance(dropped, dict) and dropped:
        out += "<h3>Dropped rows by reason</h3>" + _table(
            ["reason", "rows"], [[_e(k), _e(v)] for k, v in dropped.items()], cls="compact", num_cols=(1,))
    pii = m.get("pii_found")
    if isinstance(pii, dict):
        out += "<h3>PII found</h3>" + (_table(["kind", "found"], [[_e(k), _e(v)] for k, v in pii.items()],
                                              cls="compact", num_cols=(1,))
                                       if pii else '<p class="muted">none found</p>')
    return out


def _baselines(raw: dict[str, Any] | None) -> str:
    """Should we fine-tune? Every option's quality, cost and latency, and the recommendation."""
    if not raw:
        return ""
    from tuneline.baseline.options import BaselineReport

    report = BaselineReport.from_dict(raw)
    m = report.metric
    rows, names, values, lows, highs, colors = [], [], [], [], [], []
    for o in report.options:
        tag = (" (best)" if o.name == report.best else "") + (" (recommended)" if o.name == report.recommended else "")
        if o.skipped:
            rows.append([_e(o.name), "-", "-", "-", "-", "-", _e(f"skipped: {o.skipped}")])
            continue
        e = o.metrics.get(m)
        vs = (f"{_num(o.vs_best.value, 3, signed=True)} ({_p(o.p_vs_best)})"
              if o.vs_best is not None and o.name != report.best else "-")
        rows.append([_e(o.name + tag), _interval(e.value, e.low, e.high) if e else "-", vs,
                     f"{o.one_off_seconds:.0f} s",
                     f"{o.p50_ms:.0f} / {o.p95_ms:.0f}" if o.p50_ms is not None and o.p95_ms is not None else "-",
                     f"{o.prompt_tokens:.0f}" if o.prompt_tokens is not None else "-", _e(o.description)])
        if e:
            names.append(o.name)
            values.append(e.value)
            lows.append(e.low)
            highs.append(e.high)
            colors.append("#2da44e" if o.name == report.recommended else "#1f77b4")
    out = (f'<h2 id="baselines">Should we fine-tune?</h2><p>Each option on the same {report.n} {_e(report.set)} '
           f"rows, with the same metrics and 95% intervals; the difference to the best option with its p-value "
           "(McNemar for accuracy, else the paired bootstrap).</p>")
    out += _table(["option", f"{m} [95% interval]", "vs best (p)", "one-off cost", "p50 / p95 ms", "prompt tokens",
                   "what"], rows, cls="compact", num_cols=(1, 2, 3, 4, 5))
    if report.recommended:
        out += (f"<p><strong>Recommendation: {_e(report.recommended)}</strong></p><ul>"
                + "".join(f"<li>{_e(r)}</li>" for r in report.reasons) + "</ul>")
    if names:
        out += _embed(_bar_plot(names, values, lows, highs, m, f"{m} by option (green: recommended)", colors),
                      f"{m} by option")
    return out


def _search(found: Any) -> str:
    """The hyperparameter search: trials, best, importances, history and parallel-coordinates plots."""
    if found is None:
        return ""
    from tuneline.tune.report import history_plot, parallel_plot

    names = list(found.trials[0].params) if found.trials else []
    best = found.best.number if found.best else None
    rows = []
    for t in found.trials:
        value = (_num(t.value, 4) if t.value is not None
                 else (f"({_num(t.validations[-1][1], 4)})" if t.validations else "-"))
        state = t.state + (f" (retry of {t.retry_of})" if t.retry_of is not None else "") + (
            f" ({t.attempts} attempts)" if t.attempts > 1 else "")
        rows.append([f"{t.number}{' (best)' if t.number == best else ''}",
                     *(_e(f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else t.params.get(n, ""))
                       for n in names),
                     value, _e(state), str(len(t.validations)), _num(t.seconds, 0) if t.seconds is not None else "-"])
    out = (f'<h2 id="search">Hyperparameter search</h2><p>study <code>{_e(found.study_name)}</code>, backend '
           f"{_e(found.backend)}, {len(found.trials)} trials; objective: validation {_e(found.metric)} "
           f"({_e(found.direction)}). Pruned trials show their last validation in brackets.</p>")
    if found.best is not None:
        params = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in found.best.params.items())
        out += f"<p><strong>Best: trial {found.best.number}</strong>, {_e(found.metric)} {_num(found.best.value, 4)}, with {_e(params)}.</p>"
    out += _table(["trial", *names, found.metric, "state", "validations", "seconds"], rows, cls="compact",
                  num_cols=tuple(range(1, len(names) + 2)))
    if found.importances:
        out += "<h3>Parameter importances</h3>" + _table(
            ["parameter", "importance"], [[_e(k), _num(v, 2)] for k, v in
                                          sorted(found.importances.items(), key=lambda kv: -kv[1])],
            cls="compact", num_cols=(1,))
    out += _embed(history_plot(found, _figure), "optimization history",
                  "Each trial's validation score; the line is the best so far.")
    out += _embed(parallel_plot(found, _figure), "parallel coordinates",
                  "Complete trials across the searched parameters, coloured by score.")
    return out


def render_html(suite: EvalSuite, *, title: str, spec_text: str | None, dataset: dict[str, Any] | None,
                loss_curves: dict[str, list[tuple[int, float]]], run_info: dict[str, str],
                search: Any = None) -> str:
    """One self-contained HTML page (inline CSS, plots as inline SVG images, no script, no URL)."""
    nav = [("gates", "Gates")]
    nav += [(f"set-{_slug(s.name)}", s.name) for s in suite.sets]
    for attr, anchor, label in (("forgetting", "forgetting", "Forgetting"), ("robustness", "robustness", "Robustness"),
                                ("latency", "latency", "Latency"), ("human", "human", "Human evaluation")):
        if getattr(suite, attr):
            nav.append((anchor, label))
    if suite.baselines:
        nav.append(("baselines", "Should we fine-tune?"))
    if search is not None:
        nav.append(("search", "Search"))
    nav.append(("loss", "Loss"))
    if dataset:
        nav.append(("data", "Data"))
    if spec_text:
        nav.append(("spec", "Spec"))
    nav_html = "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav) + "</nav>"
    body = [
        _header(suite, title, run_info),
        nav_html,
        _headline(suite),
        _gates(suite.gates),
        *(_set_section(s, suite.primary) for s in suite.sets),
        _forgetting(suite.forgetting),
        _robustness(suite.robustness),
        _latency(suite.latency),
        _human(suite.human),
        _baselines(suite.baselines),
        _search(search),
        _losses(loss_curves),
        _dataset(dataset),
        f'<h2 id="spec">Spec</h2><pre>{_e(spec_text)}</pre>' if spec_text else "",
        '<p class="note">Written by <code>tuneline report</code>.</p>',
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")


# --- MLflow --------------------------------------------------------------------------------------

def _find_run(client: Any, ref: str, uri: str) -> Any:
    """The run whose id is ``ref`` or starts with it (at least :data:`MIN_PREFIX` characters)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    ref = ref.strip().lower()
    if not ref:
        raise TunelineError(Problem("no run id given", hint="list runs with `tuneline runs`"))
    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    if len(ref) < MIN_PREFIX:
        raise TunelineError(Problem(f"run id prefix {ref!r} is too short",
                                    hint=f"give at least {MIN_PREFIX} characters; list runs with `tuneline runs`"))
    exps = client.search_experiments(view_type=ViewType.ALL)
    matches: list[Any] = []
    if exps:
        token = None
        while True:
            page = client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL,
                                      max_results=1000, page_token=token)
            matches += [r for r in page if r.info.run_id.startswith(ref)]
            token = page.token
            if not token:
                break
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise TunelineError(Problem(f"no run {ref!r} in the tracking store {uri}",
                                    hint="list runs with `tuneline runs` (and pass the same --workspace)"))
    ids = ", ".join(r.info.run_id for r in matches[:5])
    raise TunelineError(Problem(f"{len(matches)} runs start with {ref!r}: {ids}",
                                hint="give more characters of the run id"))


def _artifact_paths(client: Any, run_id: str, folder: str) -> set[str]:
    try:
        return {a.path for a in client.list_artifacts(run_id, folder)}
    except Exception:  # a missing folder raises on some artifact stores
        return set()


def _download_text(client: Any, run_id: str, path: str, dest: Path) -> str:
    # a progress bar per small file is noise on the console; honour an explicit setting
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ.setdefault(key, "false")
    try:
        local = client.download_artifacts(run_id, path, str(dest))
    finally:
        if saved is None:
            os.environ.pop(key, None)
    return Path(local).read_text(encoding="utf-8")


def write_report(run_ref: str, workspace: str | Path | None = None, out: Path | None = None, *,
                 uri: str | None = None) -> Path:
    """Render the tracked run ``run_ref`` (id or unique prefix) as HTML; return the file written.

    Default file: ``<workspace>/reports/<run id>.html``. ``uri`` overrides the tracking store (by
    default the workspace's SQLite store).
    """
    from mlflow.tracking import MlflowClient

    from tuneline.workspace import Workspace

    ws = Workspace.at(workspace)
    tracking = uri or ws.tracking_uri
    client = MlflowClient(tracking_uri=tracking)
    run = _find_run(client, run_ref, tracking)
    run_id = run.info.run_id

    if "eval/report.json" not in _artifact_paths(client, run_id, "eval"):
        raise TunelineError(Problem(f"run {run_id} has no evaluation report (artifact eval/report.json)",
                                    hint="run `tuneline eval SPEC` first, then `tuneline report` again"))
    with tempfile.TemporaryDirectory(prefix="tuneline-report-") as tmp:
        tmp_dir = Path(tmp)
        raw = json.loads(_download_text(client, run_id, "eval/report.json", tmp_dir))
        try:
            suite = EvalSuite.from_dict(raw)
        except (KeyError, TypeError) as e:
            raise TunelineError(Problem(
                f"run {run_id}: eval/report.json is not an evaluation suite ({type(e).__name__}: {e})",
                hint="it was probably written by an older tuneline; run `tuneline eval SPEC` to re-evaluate")) from e
        spec_text = None
        if "spec/tuneline.yaml" in _artifact_paths(client, run_id, "spec"):
            spec_text = _download_text(client, run_id, "spec/tuneline.yaml", tmp_dir)
        dataset = None
        if "dataset/manifest.json" in _artifact_paths(client, run_id, "dataset"):
            dataset = json.loads(_download_text(client, run_id, "dataset/manifest.json", tmp_dir))

        search = None
        if "search/summary.json" in _artifact_paths(client, run_id, "search"):
            from tuneline.tune.study import SearchResult

            search = SearchResult.from_dict(json.loads(_download_text(client, run_id, "search/summary.json", tmp_dir)))

    curves: dict[str, list[tuple[int, float]]] = {}
    for key in LOSS_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            curves[key] = [(int(m.step), float(m.value)) for m in history]

    exp = client.get_experiment(run.info.experiment_id)
    tags = run.data.tags
    info = {"run id": run_id, "experiment": exp.name if exp else run.info.experiment_id}
    if run.info.run_name:
        info["run name"] = run.info.run_name
    info["status"] = run.info.status
    if run.info.start_time:
        import datetime as dt

        started = dt.datetime.fromtimestamp(run.info.start_time / 1000, tz=dt.UTC)
        info["started"] = started.strftime("%Y-%m-%d %H:%M:%S UTC")
    for tag, label in (("tuneline.model", "model"), ("tuneline.dataset_version", "dataset version"),
                       ("mlflow.source.git.commit", "git commit")):
        if tags.get(tag):
            info[label] = tags[tag]

    title = f"tuneline report: {suite.spec} ({run_id[:12]})"
    page = render_html(suite, title=title, spec_text=spec_text, dataset=dataset, loss_curves=curves, run_info=info,
                       search=search)
    path = Path(out) if out is not None else ws.root / "reports" / f"{run_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
