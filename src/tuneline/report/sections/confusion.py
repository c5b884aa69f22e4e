"""The confusion matrix of the classifier worth looking at (candidate, else production, else
base): a heatmap of the labels involved in the most confusions, and the most frequent pairs."""

from __future__ import annotations

from tuneline.eval.results import Confusion, SetResult
from tuneline.report.page import embed, esc, html_table, num
from tuneline.report.plots import confusion_focus, confusion_plot

CONFUSION_TOP = 20  # labels shown in the heatmap
PAIRS_SHOWN = 15  # most frequent (reference, predicted) pairs listed
PREFERRED = ("candidate", "production", "base")


def confusion(st: SetResult) -> str:
    present = [s for s in (st.system(n) for n in PREFERRED) if s is not None and s.confusion is not None]
    if not present:
        return ""
    s = present[0]
    conf = s.confusion
    assert conf is not None
    rows, cols, n_confused = confusion_focus(conf, CONFUSION_TOP)
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
    fig = confusion_plot(conf, rows, cols, s.name)
    plot = embed(fig, f"confusion matrix of {s.name}", what)
    return f"<h3>Confusion matrix ({esc(s.name)})</h3>{plot}{_top_pairs(conf, s.name)}"


def _top_pairs(conf: Confusion, system: str) -> str:
    """The most frequent wrong (reference, predicted) pairs, folded."""
    pairs = []
    for i, row in enumerate(conf.matrix):
        for j, count in enumerate(row):
            if count and i < len(conf.labels) and j < len(conf.columns) and conf.labels[i] != conf.columns[j]:
                pairs.append((count, conf.labels[i], conf.columns[j]))
    if not pairs:
        return ""
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    table = html_table(["reference", "predicted", "count"],
                       [[esc(r), esc(p), num(c)] for c, r, p in pairs[:PAIRS_SHOWN]], cls="compact", num_cols=(2,))
    return (f"<details><summary>Most frequent confusions of {esc(system)} "
            f"({min(PAIRS_SHOWN, len(pairs))} of {len(pairs)} pairs)</summary>{table}</details>")
