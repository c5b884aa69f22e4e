"""Monitoring test data: check results built by hand, and an in-memory alert ledger that follows
the monitor store's rule (one alert per model and detector per window; overlapping windows are
the same window)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneline.monitor.results import CheckResult, DetectorResult, Window


def detector(name: str = "input.embedding", *, value: float | None = 0.2, threshold: float | None = 0.05,
             status: str | None = None, p_value: float | None = 0.001, detail: str = "MMD^2 0.2 (p 0.001)",
             extra: dict | None = None) -> DetectorResult:
    """One detector's result; fired when ``value`` is above ``threshold`` unless ``status`` says."""
    if status is None:
        if value is None:
            status = "insufficient"
        elif threshold is None:
            status = "info"
        else:
            status = "alert" if value > threshold else "ok"
    group = name.split(".", 1)[0]
    return DetectorResult(name=name, group=group, status=status, value=value, threshold=threshold,  # type: ignore[arg-type]
                          detail=detail, p_value=p_value, n_reference=2000, n_current=500, extra=extra or {})


def check(results: list[DetectorResult], *, start: float, end: float, at: float | None = None,
          model: str = "support-bot", version: int | None = 3, requests: int = 500) -> CheckResult:
    return CheckResult(model=model, version=version, dataset_version="ds-1a2b3c", at=end if at is None else at,
                       window=Window(start=start, end=end, requests=requests), results=results)


@dataclass
class MemoryLedger:
    """The store's ``claim_alert`` / ``release_alert`` rule, in memory."""

    claims: list[tuple[str, str, float, float, str]] = field(default_factory=list)

    def claim_alert(self, model: str, detector: str, window_start: float, window_end: float, payload: str) -> bool:
        for m, d, s, e, _ in self.claims:
            if m == model and d == detector and s <= window_end and window_start <= e:
                return False
        self.claims.append((model, detector, window_start, window_end, payload))
        return True

    def release_alert(self, model: str, detector: str, window_start: float) -> None:
        self.claims = [c for c in self.claims if not (c[0] == model and c[1] == detector and c[2] == window_start)]
