"""The page itself: HTML skeleton, CSS, escaping, number formatting, tables and embedded images.

Every section builds its HTML from these helpers. Cell text given to :func:`html_table` and
:func:`kv_table` is HTML already (escape user text with :func:`esc`); headers and keys are plain
text and escaped here.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSS = """
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


def document(title: str, parts: Iterable[str]) -> str:
    """The whole page: head with the inline style, then the non-empty ``parts`` one per line."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


# --- text and numbers ------------------------------------------------------------------------------

def esc(x: object) -> str:
    """``x`` as HTML text (``None``: empty), quotes escaped too."""
    return escape("" if x is None else str(x), quote=True)


def num(x: float | None, digits: int = 3, signed: bool = False) -> str:
    """A number for a table: ints with thousands separators, floats with ``digits`` decimals,
    ``-`` for none and ``n/a`` for NaN."""
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:+,d}" if signed else f"{x:,d}"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def interval(value: float | None, low: float | None, high: float | None, digits: int = 3,
             signed: bool = False) -> str:
    """``value [low, high]``, or the value alone when the interval is unknown."""
    text = num(value, digits, signed)
    if low is None or high is None:
        return text
    return f"{text} [{num(low, digits, signed)}, {num(high, digits, signed)}]"


def p_value(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def slug(text: str) -> str:
    """An anchor id made of ``text``."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


# --- tables ----------------------------------------------------------------------------------------

def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "",
               num_cols: Iterable[int] = ()) -> str:
    """``headers`` are plain text (escaped here); ``rows`` cells are HTML, already escaped. A cell
    that starts with ``<td`` is used as it is (its own class)."""
    nums = set(num_cols)
    head = "".join(f'<th{" class=num" if i in nums else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
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


def kv_table(pairs: Iterable[tuple[str, str]]) -> str:
    """Key/value table; values are HTML, already escaped."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def text_cell(x: object) -> str:
    """A table cell for free text (wraps, keeps line breaks)."""
    return f'<td class="text">{esc(x)}</td>'


def verdict_cell(ok: bool, yes: str, no: str) -> str:
    """A green ``yes`` or a red ``no`` cell."""
    return f'<td class="ok">{yes}</td>' if ok else f'<td class="bad">{no}</td>'


# --- images ----------------------------------------------------------------------------------------

def embed(fig: Figure, alt: str, caption: str = "") -> str:
    """``fig`` as an SVG ``data:`` image in a ``<figure>`` (fonts drawn as paths, no date, a fixed
    hash salt: the same figure gives the same bytes)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "tuneline", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure><img class="plot" alt="{esc(alt)}" src="data:image/svg+xml;base64,{data}">'
            f"{cap}</figure>")
