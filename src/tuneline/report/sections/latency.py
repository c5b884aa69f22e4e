"""Latency: single-request generation time (p50, p95, mean) and throughput."""

from __future__ import annotations

from tuneline.eval.results import Latency
from tuneline.report.page import html_table, num

ANCHOR = "latency"
NAV = "Latency"


def latency(lat: Latency | None) -> str:
    if lat is None:
        return ""
    table = html_table(["requests", "p50 ms", "p95 ms", "mean ms", "tokens/s"],
                       [[num(lat.n), num(lat.p50_ms, 1), num(lat.p95_ms, 1), num(lat.mean_ms, 1),
                         num(lat.tokens_per_second, 1)]], num_cols=range(5))
    return (f'<h2 id="{ANCHOR}">Latency</h2>{table}'
            '<p class="note">One request at a time (batch 1), as a server answers a single client.</p>')
