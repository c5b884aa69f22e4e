"""The page in order: header, navigation, headline, gates, one section per evaluation set, then
forgetting, robustness, latency, human evaluation, baselines, comparison, search, loss, data, spec."""

from __future__ import annotations

from collections.abc import Mapping

from tuneline.eval.results import EvalSuite
from tuneline.report.page import document, esc
from tuneline.report.sections import (
    baselines,
    compare,
    data,
    forgetting,
    gates,
    header,
    human,
    latency,
    loss,
    robustness,
    sets,
    spec,
)
from tuneline.report.sections import search as search_section
from tuneline.tune.study import SearchResult

FOOTER = '<p class="note">Written by <code>tuneline report</code>.</p>'


def render_html(suite: EvalSuite, *, title: str, spec_text: str | None, dataset: Mapping[str, object] | None,
                loss_curves: dict[str, list[tuple[int, float]]], run_info: dict[str, str],
                search: SearchResult | None = None, comparison: Mapping[str, object] | None = None) -> str:
    """One self-contained HTML page (inline CSS, plots as inline SVG images, no script, no URL)."""
    body = [
        header.header(suite, title, run_info),
        _nav(suite, spec_text=spec_text, dataset=dataset, search=search, comparison=comparison),
        header.headline(suite),
        gates.gates(suite.gates),
        *(sets.set_section(s, suite.primary) for s in suite.sets),
        forgetting.forgetting(suite.forgetting),
        robustness.robustness(suite.robustness),
        latency.latency(suite.latency),
        human.human(suite.human),
        baselines.baselines(suite.baselines),
        compare.compare(comparison),
        search_section.search(search),
        loss.losses(loss_curves),
        data.dataset(dataset),
        spec.spec(spec_text),
        FOOTER,
    ]
    return document(title, body)


def _nav(suite: EvalSuite, *, spec_text: str | None, dataset: Mapping[str, object] | None,
         search: SearchResult | None, comparison: Mapping[str, object] | None = None) -> str:
    """Links to the sections the page has (gates and loss always; the others when present)."""
    links = [(gates.ANCHOR, gates.NAV)]
    links += [(sets.anchor(s), s.name) for s in suite.sets]
    optional = ((suite.forgetting, forgetting.ANCHOR, forgetting.NAV),
                (suite.robustness, robustness.ANCHOR, robustness.NAV),
                (suite.latency, latency.ANCHOR, latency.NAV),
                (suite.human, human.ANCHOR, human.NAV),
                (suite.baselines, baselines.ANCHOR, baselines.NAV),
                (comparison, compare.ANCHOR, compare.NAV),
                (search, search_section.ANCHOR, search_section.NAV))
    links += [(anchor, label) for present, anchor, label in optional if present]
    links.append((loss.ANCHOR, loss.NAV))
    if dataset:
        links.append((data.ANCHOR, data.NAV))
    if spec_text:
        links.append((spec.ANCHOR, spec.NAV))
    return "<nav>" + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in links) + "</nav>"
