"""Spec: the run's spec file, as it was logged."""

from __future__ import annotations

from tuneline.report.page import esc

ANCHOR = "spec"
NAV = "Spec"


def spec(text: str | None) -> str:
    return f'<h2 id="{ANCHOR}">Spec</h2><pre>{esc(text)}</pre>' if text else ""
