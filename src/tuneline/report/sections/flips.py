"""Flips: the items one system got right and the other wrong (classification: fixed / broken), or
whose score moved by the set threshold (generation: improved / worsened), folded per kind."""

from __future__ import annotations

from tuneline.eval.results import FLIP_MEANINGS, Flip, SetResult
from tuneline.report.page import esc, html_table, num, text_cell

MAX_FLIPS_SHOWN = 50  # per list (fixed / broken)


def flips(st: SetResult, primary: str = "") -> str:
    if not st.flips:
        return ""
    parts = ["<h3>Flips</h3>"]
    for key, items in st.flips.items():
        later, _, earlier = key.partition("_vs_")
        title = f"{later} vs {earlier}" if earlier else key
        kinds = ("improved", "worsened") if any(f.delta is not None for f in items) else ("fixed", "broken")
        for kind in kinds:
            meaning = FLIP_MEANINGS[kind].format(later=later, earlier=earlier or "before", primary=primary or "score")
            of_kind = [f for f in items if f.kind == kind]
            shown = of_kind[:MAX_FLIPS_SHOWN]
            count = (f"{len(of_kind):,}" if len(of_kind) == len(shown)
                     else f"{len(of_kind):,}, showing the first {len(shown)}")
            summary = f"{title}: {kind} ({count}) - {meaning}"
            body = flip_table(shown, st) if shown else '<p class="muted">none</p>'
            parts.append(f"<details><summary>{esc(summary)}</summary>{body}</details>")
    return "".join(parts)


def flip_table(shown: list[Flip], st: SetResult | None = None) -> str:
    """The flips' items: input, reference (multi-reference items: the one closest to the later
    answer, all of them folded out), both answers, where; generation tasks also the change of the
    item's primary score."""
    if not any(f.n_references > 1 for f in shown):
        headers = ["#", "input", "reference", "before", "after", "where"]
        rows = [[num(f.index), text_cell(f.input), text_cell(f.reference), text_cell(f.before),
                 text_cell(f.after), text_cell(f.where)] for f in shown]
    else:
        headers = ["#", "input", "closest reference to after", "before", "after", "where"]
        every = st.all_references() if st is not None else []
        rows = [[num(f.index), text_cell(f.input), _closest_cell(f, every), text_cell(f.before),
                 text_cell(f.after), text_cell(f.where)] for f in shown]
    num_cols: tuple[int, ...] = (0,)
    if any(f.delta is not None for f in shown):
        headers.append("change")
        num_cols = (0, len(headers) - 1)
        for row, f in zip(rows, shown, strict=True):
            row.append(f"{f.delta:+.3f}" if f.delta is not None else "")
    return html_table(headers, rows, cls="compact", num_cols=num_cols)


def _closest_cell(f: Flip, every: list[list[str]]) -> str:
    """The reference closest to the later answer, with every reference of the item folded out."""
    closest = f.closest_reference if f.closest_reference is not None else f.reference
    refs = every[f.index] if 0 <= f.index < len(every) else [closest]
    listed = "".join(f"<li>{esc(r)}</li>" for r in refs)
    if len(refs) <= 1:
        return text_cell(closest)
    return (f'<td class="text">{esc(closest)}<details><summary>all {len(refs)} references</summary>'
            f"<ol>{listed}</ol></details></td>")
