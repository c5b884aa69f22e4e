"""Human evaluation: the imported judgements' win rate against the other system, and any other
field the import recorded."""

from __future__ import annotations

import json
from collections.abc import Mapping

from tuneline.report.page import esc, interval, kv_table

ANCHOR = "human"
NAV = "Human evaluation"
KNOWN = ("against", "n", "win_rate", "low", "high", "wins", "losses", "ties")


def _number(x: object) -> float | None:
    """A number as it was stored (an int stays an int, so it prints without decimals)."""
    return x if isinstance(x, (int, float)) else None


def human(h: Mapping[str, object] | None) -> str:
    if not h:
        return ""
    pairs: list[tuple[str, str]] = []
    if "against" in h:
        pairs.append(("against", esc(h["against"])))
    if "n" in h:
        pairs.append(("judged items", esc(h["n"])))
    if "win_rate" in h:
        pairs.append(("win rate", interval(_number(h.get("win_rate")), _number(h.get("low")),
                                           _number(h.get("high")))))
    wlt = [f"{k} {esc(h[k])}" for k in ("wins", "losses", "ties") if k in h]
    if wlt:
        pairs.append(("wins / losses / ties", ", ".join(wlt)))
    for k, v in h.items():
        if k not in KNOWN:
            pairs.append((str(k), esc(v if isinstance(v, str) else json.dumps(v, default=str))))
    return f'<h2 id="{ANCHOR}">Human evaluation</h2>{kv_table(pairs)}'
