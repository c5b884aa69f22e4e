"""One section per evaluation set: what the set is, every system's metrics with intervals, the
primary metric as a plot, paired comparisons, per-class scores, then the confusion matrix and flips
(:mod:`.confusion`, :mod:`.flips`)."""

from __future__ import annotations

import math
import statistics

from tuneline.eval.results import SYSTEMS, Comparison, SetResult, SystemResult
from tuneline.report.page import embed, esc, html_table, interval, kv_table, num, p_value, slug
from tuneline.report.plots import OTHER_SYSTEM_COLOR, SYSTEM_COLORS, bar_plot
from tuneline.report.sections.confusion import confusion
from tuneline.report.sections.flips import flips


def anchor(st: SetResult) -> str:
    return f"set-{slug(st.name)}"


def set_section(st: SetResult, primary: str) -> str:
    return "".join([
        f'<h2 id="{anchor(st)}">Evaluation set: {esc(st.name)}</h2>',
        kv_table(_facts(st)),
        "<h3>Metrics</h3>",
        _metric_table(st, primary),
        _primary_plot(st, primary),
        _comparisons(st.comparisons),
        _per_class(st),
        confusion(st),
        flips(st, primary),
    ])


def _facts(st: SetResult) -> list[tuple[str, str]]:
    """Kind, size (items and references per item when an item has several), version, hash, path."""
    counts = st.reference_counts()
    if counts and max(counts) > 1:
        low, median, high = min(counts), statistics.median(counts), max(counts)
        meta = [("kind", esc(st.kind)), ("items", num(st.n)),
                ("references per item", f"{low} / {median:g} / {high} (min / median / max; "
                                        f"{sum(counts):,} references in all)")]
    else:
        meta = [("kind", esc(st.kind)), ("rows", num(st.n))]
    if st.version is not None:
        meta.append(("version", num(st.version)))
    if st.sha256:
        meta.append(("sha256", f"<code>{esc(st.sha256)}</code>"))
    if st.path:
        meta.append(("path", f"<code>{esc(st.path)}</code>"))
    return meta


def ordered_systems(st: SetResult) -> list[str]:
    """The set's system names: base, candidate, production first, then any other."""
    names = [s.name for s in st.systems]
    return [n for n in SYSTEMS if n in names] + [n for n in names if n not in SYSTEMS]


def _present(st: SetResult) -> list[SystemResult]:
    return [s for s in (st.system(n) for n in ordered_systems(st)) if s is not None]


def _metric_table(st: SetResult, primary: str) -> str:
    present = _present(st)
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
        cells = [f"<b>{esc(k)}</b>" if k == primary else esc(k)]
        for s in present:
            est = s.metrics.get(k)
            cells.append("-" if est is None else interval(est.value, est.low, est.high))
        rows.append(cells)
    rows.append(["model"] + [f'<td class="text">{esc(s.model)}</td>' for s in present])
    rows.append(["seconds per example"] + [num(s.seconds_per_example) for s in present])
    cols = range(1, len(present) + 1)
    note = '<p class="note">value [low, high]: 95% bootstrap interval.</p>'
    return html_table(["metric", *[s.name for s in present]], rows, num_cols=cols) + note


def _comparisons(comps: list[Comparison]) -> str:
    if not comps:
        return ""
    rows = []
    for c in comps:
        sig = '<td class="ok">yes</td>' if c.significant else "<td>no</td>"
        disc = "-" if c.a_only is None or c.b_only is None else f"{c.a_only:,} / {c.b_only:,}"
        rows.append([f"{esc(c.a)} vs {esc(c.b)}", esc(c.metric),
                     interval(c.diff.value, c.diff.low, c.diff.high, signed=True), p_value(c.p_value),
                     esc(c.test), sig, disc])
    table = html_table(["comparison", "metric", "difference (a - b)", "p-value", "test", "significant",
                        "only a right / only b right"], rows, num_cols=(2, 3, 6))
    return f"<h3>Paired comparisons</h3>{table}"


def _primary_plot(st: SetResult, primary: str) -> str:
    names: list[str] = []
    values: list[float] = []
    lows: list[float | None] = []
    highs: list[float | None] = []
    colors: list[str] = []
    for s in _present(st):
        est = s.metrics.get(primary)
        if est is None or est.value is None or (isinstance(est.value, float) and math.isnan(est.value)):
            continue
        names.append(s.name)
        values.append(est.value)
        lows.append(est.low)
        highs.append(est.high)
        colors.append(SYSTEM_COLORS.get(s.name, OTHER_SYSTEM_COLOR))
    if not names:
        return ""
    fig = bar_plot(names, values, lows, highs, primary, f"{primary} on {st.name} (n={st.n:,})", colors)
    return embed(fig, f"{primary} per system on {st.name}", "Error bars: 95% bootstrap interval.")


def _f1(s: SystemResult, label: str) -> float | None:
    v = s.per_class.get(label, {}).get("f1")
    return None if v is None else float(v)


def _per_class(st: SetResult) -> str:
    """Per-label F1 of every system (worst label of the candidate first), the candidate's change
    from base, its precision and recall; folded, as there can be many labels."""
    present = [s for s in _present(st) if s.per_class]
    if not present:
        return ""
    labels = sorted({lab for s in present for lab in s.per_class})
    focus = next((s for s in present if s.name == "candidate"), present[-1])
    base = next((s for s in present if s.name == "base" and s is not focus), None)
    labels.sort(key=lambda lab: (_f1(focus, lab) if _f1(focus, lab) is not None else -1.0, lab))
    rows = []
    for lab in labels:
        support = next((s.per_class[lab].get("support") for s in present if lab in s.per_class), None)
        cells = [esc(lab), num(int(support)) if support is not None else "-"]
        cells += [num(_f1(s, lab)) for s in present]
        if base is not None:
            a, b = _f1(focus, lab), _f1(base, lab)
            cells.append(num(a - b, signed=True) if a is not None and b is not None else "-")
        p = focus.per_class.get(lab, {})
        cells += [num(p.get("precision")), num(p.get("recall"))]
        rows.append(cells)
    headers = ["label", "support", *[f"F1 {s.name}" for s in present]]
    if base is not None:
        headers.append(f"F1 {focus.name} - base")
    headers += [f"precision {focus.name}", f"recall {focus.name}"]
    table = html_table(headers, rows, cls="compact", num_cols=range(1, len(headers)))
    return (f"<details><summary>Per-class scores ({len(labels)} labels, worst {esc(focus.name)} F1 first)"
            f"</summary>{table}</details>")
