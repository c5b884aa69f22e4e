"""The monitoring report (``tuneline monitor report``): one self-contained HTML page per served
model, read without a server or a network.

In order: a header (model, version, reference dataset version, checks and alerts counted), the
latest check as a table (detector, status, value, threshold, p-value, detail), one time series per
detector (its value at each check, its threshold line, the checks where it fired and the alerts
sent), the alerts sent, and examples of drifted inputs (the current inputs farthest from the
reference, grouped).

The page follows the run report's rules (:mod:`tuneline.report.page`: its style and table
helpers): no script, no external URL, every text escaped (inputs come from users). The charts are
inline SVG drawn here, so the page needs neither matplotlib nor a browser plugin.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuneline.monitor.results import CheckResult, DetectorResult
from tuneline.report.page import CSS, esc, html_table, kv_table, num, p_value, slug, text_cell
from tuneline.workspace import Workspace

GROUP_ORDER = {"input": 0, "output": 1, "quality": 2, "operations": 3}
STATUS_TEXT = {"ok": "ok", "alert": "ALERT", "insufficient": "not enough data", "info": "reported only"}
MAX_EXAMPLES = 5  # drifted inputs shown per group
FOOTER = '<p class="note">Written by <code>tuneline monitor report</code>.</p>'
EXTRA_CSS = """
svg.series { display: block; margin: 4px 0 2px; max-width: 100%; height: auto; }
svg.series text { font: 11px sans-serif; fill: #57606a; }
span.bad, td.alert { color: var(--bad); font-weight: 600; } td.insufficient, td.info { color: var(--muted); }
.legend { font-size: 12.5px; color: var(--muted); margin: 0 0 14px; }
.sw { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin: 0 4px 0 10px; }
ol.examples li { white-space: pre-wrap; overflow-wrap: anywhere; margin: 2px 0; }
"""

# chart geometry (SVG user units)
WIDTH, HEIGHT = 720, 190
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 18, 30
VALUE_COLOR, THRESHOLD_COLOR, ALERT_COLOR, MUTED = "#1f6feb", "#cf222e", "#cf222e", "#8c959f"


class DriftedGroup(Protocol):
    """A group of current inputs far from the reference (:mod:`tuneline.monitor.drifted`); read
    only, so a frozen dataclass fits."""

    @property
    def size(self) -> int: ...

    @property
    def mean_distance(self) -> float: ...

    @property
    def examples(self) -> Sequence[str]: ...


def monitor_report_path(workspace: Workspace, model: str) -> Path:
    """Where ``tuneline monitor report`` writes ``model``'s page by default."""
    return workspace.reports_dir / f"monitor-{slug(model)}.html"


def write_monitor_report(path: str | Path, model: str, checks: Sequence[CheckResult],
                         alerts: Sequence[Mapping[str, object]],
                         drifted: Sequence[DriftedGroup | Mapping[str, object]] | None) -> Path:
    """Write ``model``'s monitoring page to ``path`` (folders created); return the path.

    ``checks``: the stored checks (any order); ``alerts``: the alerts sent, as the webhook payload
    (:func:`tuneline.monitor.alerts.alert_payload`) or a store row holding it under ``payload``;
    ``drifted``: groups of drifted inputs (objects or dicts with ``size``, ``mean_distance`` and
    ``examples``), or None when not computed."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_monitor_report(model, checks, alerts, drifted), encoding="utf-8")
    return out


def render_monitor_report(model: str, checks: Sequence[CheckResult], alerts: Sequence[Mapping[str, object]],
                          drifted: Sequence[DriftedGroup | Mapping[str, object]] | None) -> str:
    """The page as a string (see :func:`write_monitor_report`)."""
    ordered = sorted((c for c in checks if c.model == model), key=lambda c: c.at)
    sent = sorted((_alert_row(a) for a in alerts), key=lambda a: a.at)
    sent = [a for a in sent if a.model in (None, model)]
    title = f"tuneline monitor: {model}"
    nav = ("<nav>" + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in (
        ("latest", "latest check"), ("series", "detectors over time"), ("alerts", "alerts sent"),
        ("drifted", "drifted inputs"))) + "</nav>")
    body = [f"<h1>{esc(title)}</h1>", _header(model, ordered, sent), nav,
            _latest(ordered), _series(ordered, sent), _alerts(sent), _drifted(drifted), FOOTER]
    return _document(title, body)


def _document(title: str, parts: list[str]) -> str:
    """The run report's page skeleton and style, plus this page's chart styles."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


# --- alerts as rows --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SentAlert:
    model: str | None
    detector: str
    at: float  # the check that sent it
    value: float | None
    threshold: float | None
    window_start: float | None
    window_end: float | None
    text: str


def _alert_row(raw: Mapping[str, object]) -> SentAlert:
    """An alert from its payload, or from a store row (its columns plus the payload as JSON)."""
    merged: dict[str, object] = {}
    payload = raw.get("payload")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            payload = None
    if isinstance(payload, Mapping):
        merged.update(payload)
    merged.update({k: v for k, v in raw.items() if k != "payload" and v is not None})
    at = _float(merged.get("checked_at")) or _float(merged.get("sent_at")) or _float(merged.get("at")) or 0.0
    model = merged.get("model")
    return SentAlert(model=str(model) if model is not None else None, detector=str(merged.get("detector", "?")),
                    at=at, value=_float(merged.get("value")), threshold=_float(merged.get("threshold")),
                    window_start=_float(merged.get("window_start")), window_end=_float(merged.get("window_end")),
                    text=str(merged.get("detail") or merged.get("text") or ""))


def _float(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


# --- sections --------------------------------------------------------------------------------------

def _header(model: str, checks: list[CheckResult], sent: list[SentAlert]) -> str:
    if not checks:
        return f'<p class="note">No stored check for {esc(model)} yet: run <code>tuneline monitor check</code>.</p>'
    last = checks[-1]
    version = f"v{last.version}" if last.version is not None else "base model"
    fired = ", ".join(r.name for r in last.fired) or "none"
    return kv_table([
        ("model", f"{esc(model)} ({esc(version)})"),
        ("reference", esc(last.dataset_version or "-")),
        ("checks", f"{len(checks)}, {esc(_when(checks[0].at))} .. {esc(_when(last.at))}"),
        ("latest window", f"{last.window.requests:,d} requests, {esc(_when(last.window.start))} .. "
                          f"{esc(_when(last.window.end))}"),
        ("firing now", f'<span class="{"bad" if last.fired else "ok"}">{esc(fired)}</span>'),
        ("alerts sent", f"{len(sent)}"),
    ])


def _latest(checks: list[CheckResult]) -> str:
    head = '<h2 id="latest">Latest check</h2>'
    if not checks:
        return head + '<p class="note">No check yet.</p>'
    last = checks[-1]
    rows = [[esc(r.name), f'<td class="{r.status}">{esc(STATUS_TEXT.get(r.status, r.status))}</td>',
             _cell(r.value), _cell(r.threshold), p_value(r.p_value), f"{r.n_current:,d}", text_cell(r.detail)]
            for r in _ordered(last.results)]
    note = f'<p class="note">Checked {esc(_when(last.at))}. A detector fires when its value is above its threshold.</p>'
    return head + note + html_table(["detector", "status", "value", "threshold", "p-value", "n", "detail"], rows,
                                    cls="compact", num_cols=(2, 3, 4, 5))


def _series(checks: list[CheckResult], sent: list[SentAlert]) -> str:
    head = '<h2 id="series">Detectors over time</h2>'
    history: dict[str, list[tuple[float, DetectorResult]]] = {}
    for c in checks:
        for r in c.results:
            history.setdefault(r.name, []).append((c.at, r))
    if not history:
        return head + '<p class="note">No check yet.</p>'
    legend = ('<p class="legend"><span class="sw" style="background:#1f6feb"></span>value'
              '<span class="sw" style="background:#cf222e"></span>threshold (dashed)'
              ' &nbsp;<span style="color:#cf222e">&#9679;</span> fired'
              ' &nbsp;<span style="color:#cf222e">&#9660;</span> alert sent'
              ' &nbsp;<span style="color:#8c959f">|</span> not enough data</p>')
    t0, t1 = checks[0].at, checks[-1].at
    parts = [head, legend]
    for name in sorted(history, key=lambda n: (GROUP_ORDER.get(history[n][0][1].group, 9), n)):
        marks = [a for a in sent if a.detector == name]
        parts.append(f'<h3 id="d-{slug(name)}">{esc(name)}</h3>')
        parts.append(series_svg(name, history[name], marks, (t0, t1)))
    return "\n".join(parts)


def _alerts(sent: list[SentAlert]) -> str:
    head = '<h2 id="alerts">Alerts sent</h2>'
    if not sent:
        return head + '<p class="note">No alert was sent.</p>'
    rows = [[esc(_when(a.at)), esc(a.detector), _cell(a.value), _cell(a.threshold),
             esc(f"{_when(a.window_start)} .. {_when(a.window_end)}"), text_cell(a.text)] for a in reversed(sent)]
    return head + html_table(["sent with check", "detector", "value", "threshold", "window", "detail"], rows,
                             cls="compact", num_cols=(2, 3))


def _drifted(drifted: Sequence[DriftedGroup | Mapping[str, object]] | None) -> str:
    head = '<h2 id="drifted">Drifted inputs</h2>'
    if drifted is None:
        return head + '<p class="note">Not computed for this report.</p>'
    if not drifted:
        return head + '<p class="note">No current input stands out from the reference.</p>'
    note = ('<p class="note">The current inputs farthest from the reference (the serving version\'s '
            'training data), grouped; per group its mean distance to the nearest reference input, the '
            'farthest groups first.</p>')
    parts = [head, note]
    groups = sorted((_group(g) for g in drifted), key=lambda g: (-(g[1] or 0.0), -g[0]))
    for i, (size, distance, examples) in enumerate(groups, 1):
        items = "".join(f"<li>{esc(x)}</li>" for x in examples[:MAX_EXAMPLES])
        more = (f'<p class="note">and {len(examples) - MAX_EXAMPLES} more examples</p>'
                if len(examples) > MAX_EXAMPLES else "")
        parts.append(f"<h3>Group {i}: {size:,d} inputs, mean distance {num(distance, 3)}</h3>"
                     f'<ol class="examples">{items}</ol>{more}')
    return "\n".join(parts)


def _group(g: DriftedGroup | Mapping[str, object]) -> tuple[int, float | None, list[str]]:
    if isinstance(g, Mapping):
        size, distance, examples = g.get("size"), g.get("mean_distance"), g.get("examples")
    else:
        size, distance, examples = g.size, g.mean_distance, g.examples
    n = int(size) if isinstance(size, (int, float)) else 0
    return n, _float(distance), [str(x) for x in examples] if isinstance(examples, Sequence) and not isinstance(examples, str) else []


# --- the chart -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Scale:
    t0: float
    t1: float
    lo: float
    hi: float

    def x(self, t: float) -> float:
        if self.t1 <= self.t0:
            return LEFT + (WIDTH - LEFT - RIGHT) / 2
        t = min(max(t, self.t0), self.t1)
        return LEFT + (t - self.t0) / (self.t1 - self.t0) * (WIDTH - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return TOP + (self.hi - v) / (self.hi - self.lo) * (HEIGHT - TOP - BOTTOM)


def _scale(points: list[tuple[float, DetectorResult]], span: tuple[float, float]) -> _Scale:
    ys = [v for _, r in points for v in (_float(r.value), _float(r.threshold)) if v is not None]
    lo, hi = min([0.0, *ys]), max([0.0, *ys])
    if hi <= lo:
        hi = lo + 1.0
    return _Scale(span[0], span[1], lo, hi + 0.08 * (hi - lo))


def series_svg(name: str, points: list[tuple[float, DetectorResult]], alerts: Sequence[SentAlert],
               span: tuple[float, float]) -> str:
    """One detector's values at each check time as an inline SVG: the value line and points (red
    where it fired), its threshold as a dashed step line, a grey tick where the window had too few
    requests, and a red triangle at the top for each alert sent."""
    s = _scale(points, span)
    parts = [_axes(s), _threshold(points, s), _values(points, s), _alert_marks(alerts, s)]
    label = f"{name}: value per check with its threshold"
    return (f'<svg class="series" data-detector="{esc(name)}" role="img" aria-label="{esc(label)}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
            f"<title>{esc(label)}</title>{''.join(parts)}</svg>")


def _axes(s: _Scale) -> str:
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    out = [f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="{MUTED}"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="{MUTED}"/>']
    for v in (s.lo, (s.lo + s.hi) / 2, s.hi):
        y = s.y(v)
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#eaeef2"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(_short(v))}</text>')
    out.append(f'<text x="{x0}" y="{HEIGHT - 8}">{esc(_when(s.t0))}</text>')
    if s.t1 > s.t0:
        out.append(f'<text x="{x1}" y="{HEIGHT - 8}" text-anchor="end">{esc(_when(s.t1))}</text>')
    return "".join(out)


def _threshold(points: list[tuple[float, DetectorResult]], s: _Scale) -> str:
    steps = [(t, th) for t, r in points if (th := _float(r.threshold)) is not None]
    if not steps:
        return ""
    xy: list[str] = []
    for i, (t, th) in enumerate(steps):
        x, y = s.x(t), s.y(th)
        if i and xy:
            xy.append(f"{x:.1f},{s.y(steps[i - 1][1]):.1f}")  # a changed threshold: a step
        xy.append(f"{x:.1f},{y:.1f}")
    if len(steps) == 1 or s.t1 <= s.t0:  # a single check: a line across the chart
        y = s.y(steps[-1][1])
        xy = [f"{LEFT},{y:.1f}", f"{WIDTH - RIGHT},{y:.1f}"]
    last = steps[-1][1]
    return (f'<polyline class="threshold" points="{" ".join(xy)}" fill="none" stroke="{THRESHOLD_COLOR}" '
            f'stroke-width="1.5" stroke-dasharray="6 4"><title>threshold {esc(_short(last))}</title></polyline>'
            f'<text x="{WIDTH - RIGHT}" y="{s.y(last) - 4:.1f}" text-anchor="end" style="fill:{THRESHOLD_COLOR}">'
            f"threshold {esc(_short(last))}</text>")


def _values(points: list[tuple[float, DetectorResult]], s: _Scale) -> str:
    lines: list[list[str]] = [[]]
    marks: list[str] = []
    for t, r in points:
        v = _float(r.value)
        x = s.x(t)
        if v is None:  # too few requests: a gap in the line, a grey tick on the axis
            lines.append([])
            marks.append(f'<line class="gap" x1="{x:.1f}" y1="{HEIGHT - BOTTOM - 6}" x2="{x:.1f}" '
                         f'y2="{HEIGHT - BOTTOM}" stroke="{MUTED}" stroke-width="2">'
                         f"<title>{esc(_when(t))}: {esc(STATUS_TEXT.get(r.status, r.status))}</title></line>")
            continue
        y = s.y(v)
        lines[-1].append(f"{x:.1f},{y:.1f}")
        fired = r.status == "alert"
        tip = f"{_when(t)}: {_short(v)} ({STATUS_TEXT.get(r.status, r.status)})"
        marks.append(f'<circle class="point {"fired" if fired else esc(r.status)}" cx="{x:.1f}" cy="{y:.1f}" '
                     f'r="{4.5 if fired else 3}" fill="{ALERT_COLOR if fired else VALUE_COLOR}">'
                     f"<title>{esc(tip)}</title></circle>")
    polylines = [f'<polyline class="value" points="{" ".join(pts)}" fill="none" stroke="{VALUE_COLOR}" '
                 f'stroke-width="1.5"/>' for pts in lines if len(pts) > 1]
    return "".join(polylines) + "".join(marks)


def _alert_marks(alerts: Sequence[SentAlert], s: _Scale) -> str:
    out = []
    for a in alerts:
        x, y = s.x(a.at), TOP - 2
        tip = f"alert sent {_when(a.at)}: {a.text}" if a.text else f"alert sent {_when(a.at)}"
        out.append(f'<path class="alert-sent" d="M{x - 5:.1f},{y - 8:.1f} L{x + 5:.1f},{y - 8:.1f} L{x:.1f},{y:.1f} Z" '
                   f'fill="{ALERT_COLOR}"><title>{esc(tip)}</title></path>')
    return "".join(out)


# --- formatting ------------------------------------------------------------------------------------

def _ordered(results: list[DetectorResult]) -> list[DetectorResult]:
    return sorted(results, key=lambda r: (GROUP_ORDER.get(r.group, 9), r.name))


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _cell(v: float | None) -> str:
    """A value for a table: four significant digits (effect sizes and milliseconds alike)."""
    return "-" if v is None else f"{v:.4g}"


def _short(v: float) -> str:
    return f"{v:.3g}"
