"""The monitoring page: one chart per detector with its threshold and the alerts sent, the latest
check's table, the alerts, drifted inputs escaped, and nothing loaded from anywhere else."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from monitor_samples import check, detector

from tuneline.monitor.alerts import alert_payload
from tuneline.monitor.report import (
    DriftedGroup,
    monitor_report_path,
    render_monitor_report,
    write_monitor_report,
)
from tuneline.monitor.results import CheckResult
from tuneline.workspace import Workspace

HOUR = 3600.0
T0 = 1_700_000_000.0
XSS = '<script>alert("x")</script>'


@dataclass(frozen=True)
class Group:  # what tuneline.monitor.drifted returns: read by attribute
    size: int
    mean_distance: float
    examples: list[str]


def _history() -> list[CheckResult]:
    """Four hourly checks: the input embedding drifts from the third on; quality has too little
    feedback at first; latency is reported only."""
    checks = []
    for i, emb in enumerate([0.01, 0.02, 0.20, 0.31]):
        results = [
            detector("input.embedding", value=emb, threshold=0.05, p_value=0.0004 if emb > 0.05 else 0.4),
            detector("output.labels", value=0.03, threshold=0.15, p_value=0.5),
            detector("quality.negative_feedback", value=None if i == 0 else 0.05, threshold=0.2, p_value=None,
                     detail="3 rated answers" if i == 0 else "5% negative"),
            detector("operations.latency_p95_ms", value=120.0 + i, threshold=None, p_value=None),
        ]
        checks.append(check(results, start=T0 + i * HOUR, end=T0 + (i + 1) * HOUR))
    return checks


def _svgs(page: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r'<svg class="series" data-detector="([^"]+)".*?</svg>', page, re.S)}


def test_page_has_a_chart_per_detector_with_threshold_and_alert(tmp_path: Path) -> None:
    checks = _history()
    fired_check = checks[2]
    sent = [alert_payload(fired_check, fired_check.fired[0])]
    path = write_monitor_report(tmp_path / "r" / "m.html", "support-bot", checks, sent, None)
    page = path.read_text(encoding="utf-8")
    charts = _svgs(page)
    assert set(charts) == {"input.embedding", "output.labels", "quality.negative_feedback",
                           "operations.latency_p95_ms"}
    assert page.count('<svg class="series"') == 4
    emb = charts["input.embedding"]
    for svg in charts.values():
        ET.fromstring(svg)  # well-formed markup
    assert 'class="threshold"' in emb and "threshold 0.05" in emb
    assert emb.count('class="point fired"') == 2 and emb.count('class="point ok"') == 2
    assert emb.count('class="alert-sent"') == 1  # the alert sent with the third check
    assert 'class="alert-sent"' not in charts["output.labels"]
    assert 'class="threshold"' not in charts["operations.latency_p95_ms"]  # reported only: no line
    assert charts["quality.negative_feedback"].count('class="gap"') == 1  # not enough data once
    # in order: input before output before quality before operations
    assert page.index('data-detector="input.embedding"') < page.index('data-detector="output.labels"') \
        < page.index('data-detector="quality.negative_feedback"') < page.index('data-detector="operations.latency_p95_ms"')


def test_latest_check_table_and_alerts_table() -> None:
    checks = _history()
    row = {"id": 1, "model": "support-bot", "detector": "input.embedding", "window_start": T0 + 3 * HOUR,
           "window_end": T0 + 4 * HOUR, "at": T0 + 4 * HOUR + 5,
           "payload": json.dumps(alert_payload(checks[3], checks[3].fired[0]))}  # a row of the store's alerts table
    page = render_monitor_report("support-bot", checks, [row], None)
    latest = page.split('id="latest"')[1].split('id="series"')[0]
    assert '<td class="alert">ALERT</td>' in latest and "<td class=num>0.31</td>" in latest \
        and "<td class=num>0.05</td>" in latest
    assert "&lt;0.001" in latest  # p-value 0.0004
    assert "reported only" in latest
    alerts = page.split('id="alerts"')[1].split('id="drifted"')[0]
    assert "input.embedding" in alerts and "2023-11-15 02:13 UTC" in alerts  # the check that sent it
    assert "firing now" in page and "input.embedding</span>" in page


def test_drifted_examples_are_escaped_and_the_page_loads_nothing_external() -> None:
    drifted: list[DriftedGroup | Mapping[str, object]] = [Group(size=12, mean_distance=0.71, examples=[XSS, "how do I buy bitcoin?"]),
               {"size": 30, "mean_distance": 0.64, "examples": [f"ex {i}" for i in range(8)]}]
    checks = _history()
    page = render_monitor_report(f"bot{XSS}", [*checks, *[_rename(c, f"bot{XSS}") for c in checks]],
                                 [{"detector": XSS, "checked_at": T0, "detail": XSS}], drifted)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    drifted_part = page.split('id="drifted"')[1]
    assert drifted_part.index("12 inputs") < drifted_part.index("30 inputs")  # the farthest group first
    assert "how do I buy bitcoin?" in drifted_part and "and 3 more examples" in drifted_part
    # self-contained: no URL, no external reference of any kind
    assert not re.search(r"https?:|//[a-z0-9]|@import|url\(", page, re.I)
    assert not re.search(r"\b(src|href)=\"(?!#)", page)


def test_page_without_checks_says_so(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    path = write_monitor_report(monitor_report_path(ws, "a/b"), "a/b", [], [], [])
    page = path.read_text(encoding="utf-8")
    assert path.parent == ws.reports_dir and path.name == "monitor-a-b.html"
    assert "No stored check" in page and "No alert was sent." in page
    assert "No current input stands out" in page and '<svg class="series"' not in page


def test_a_single_check_draws_the_threshold_across() -> None:
    c = check([detector("input.embedding", value=0.2, threshold=0.05)], start=T0, end=T0 + HOUR)
    emb = _svgs(render_monitor_report("support-bot", [c], [], None))["input.embedding"]
    ET.fromstring(emb)
    assert 'class="threshold"' in emb and 'class="point fired"' in emb


def _rename(c: CheckResult, model: str) -> CheckResult:
    return CheckResult(model=model, version=c.version, dataset_version=c.dataset_version, at=c.at,
                       window=c.window, results=c.results)
