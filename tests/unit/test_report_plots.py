"""The report's plots: which part of a large confusion matrix is drawn."""

from __future__ import annotations

from report_samples import make_suite

from tuneline.report.plots import confusion_focus, confusion_view


def test_confusion_focus_keeps_rows_whole() -> None:
    candidate = make_suite().sets[0].system("candidate")
    assert candidate is not None and candidate.confusion is not None
    conf = candidate.confusion
    rows, cols, n_confused = confusion_focus(conf, 20)
    assert len(rows) == 20 and n_confused > 20 and conf.columns.index("(invalid)") in cols
    row_labels, col_labels, m = confusion_view(conf, rows, cols)
    assert col_labels[-1] == "(other labels)" and col_labels[:20] == row_labels
    for a, i in enumerate(rows):  # every prediction of a shown label is counted once
        assert m[a].sum() == sum(conf.matrix[i])
