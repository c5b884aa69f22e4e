"""Loss: the training and evaluation loss curves logged by the run, and their last values."""

from __future__ import annotations

from tuneline.report.page import embed, esc, num
from tuneline.report.plots import loss_plot

ANCHOR = "loss"
NAV = "Loss"


def losses(curves: dict[str, list[tuple[int, float]]]) -> str:
    """``curves``: metric name -> (step, value) points."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return f'<h2 id="{ANCHOR}">Loss</h2><p class="muted">No loss history was recorded for this run.</p>'
    last = ", ".join(f"{esc(k)} {num(sorted(v)[-1][1], 4)} at step {sorted(v)[-1][0]:,}" for k, v in curves.items())
    return f'<h2 id="{ANCHOR}">Loss</h2>{embed(loss_plot(curves), "loss curves")}<p class="note">Last: {last}.</p>'
