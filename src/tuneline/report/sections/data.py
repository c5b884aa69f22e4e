"""Data version: the curated dataset the run used (its manifest): rows per split, sources with
their hashes, rows dropped by reason, PII found."""

from __future__ import annotations

from collections.abc import Mapping

from tuneline.report.page import esc, html_table, kv_table, num

ANCHOR = "data"
NAV = "Data"


def dataset(m: Mapping[str, object] | None) -> str:
    """``m``: the dataset version's ``manifest.json``."""
    if not m:
        return ""
    out = f'<h2 id="{ANCHOR}">Data version</h2>{kv_table(_facts(m))}'
    dropped = m.get("dropped_by_reason")
    if isinstance(dropped, dict) and dropped:
        out += "<h3>Dropped rows by reason</h3>" + _counts(["reason", "rows"], dropped)
    pii = m.get("pii_found")
    if isinstance(pii, dict):
        out += "<h3>PII found</h3>" + (_counts(["kind", "found"], pii) if pii else '<p class="muted">none found</p>')
    return out


def _counts(headers: list[str], counts: Mapping[object, object]) -> str:
    return html_table(headers, [[esc(k), esc(v)] for k, v in counts.items()], cls="compact", num_cols=(1,))


def _facts(m: Mapping[str, object]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, label in (("id", "version"), ("spec", "spec"), ("created", "created")):
        if m.get(key) is not None:
            pairs.append((label, esc(m[key])))
    counts = m.get("counts")
    if isinstance(counts, dict) and counts:
        pairs.append(("rows per split", ", ".join(f"{esc(k)} {num(v) if isinstance(v, int) else esc(v)}"
                                                  for k, v in counts.items())))
    if m.get("rejected") is not None:
        pairs.append(("rejected rows", esc(m["rejected"])))
    labels = m.get("labels")
    if isinstance(labels, list) and labels:
        pairs.append(("labels", num(len(labels))))
    sources = m.get("sources")
    if isinstance(sources, list) and sources:
        pairs.append(("sources", "<br>".join(
            f"{esc(s.get('split', '?'))}: <code>{esc(s.get('path', '?'))}</code> "
            f"<span class=muted>{esc(str(s.get('sha256', ''))[:16])}</span>"
            for s in sources if isinstance(s, dict))))
    return pairs
