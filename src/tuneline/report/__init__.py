"""The HTML report: one self-contained page per evaluated run (``tuneline report RUN``).

The page needs nothing but a browser: no scripts, no web fonts, no external URLs. Styles are
inline and every plot is a matplotlib SVG embedded as a ``data:`` URI (fonts drawn as paths, so it
looks the same everywhere). All user text (inputs, labels, answers, the spec) is escaped.

- :func:`write_report` finds a tracked run and writes its page (:mod:`.write`);
- :func:`render_html` turns an :class:`~tuneline.eval.results.EvalSuite` and what the run logged
  into the page (:mod:`.render`), one module per section in :mod:`.sections`, with the page's
  building blocks in :mod:`.page` and the plots in :mod:`.plots`.

See ``docs/report.md``.
"""

from tuneline.report.render import render_html
from tuneline.report.write import write_report

__all__ = ["render_html", "write_report"]
