"""What a monitoring check finds: one :class:`DetectorResult` per detector, gathered in a
:class:`CheckResult` for one served model and one current window. Plain data: the store saves
it, alerts and the report read it, ``--json`` prints :meth:`CheckResult.to_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Group = Literal["input", "output", "quality", "operations"]
# ok: below its threshold; alert: fired; insufficient: too few rows for a verdict (never fires);
# info: reported only (no threshold configured)
Status = Literal["ok", "alert", "insufficient", "info"]


@dataclass(frozen=True)
class DetectorResult:
    """One detector's verdict on one window.

    ``value`` is the statistic compared with ``threshold`` (an effect size or a rate's 95% lower
    bound; None when there was too little data); ``p_value`` the test's, where the detector runs
    a test. ``detail`` is one line a person reads in the table and the alert."""

    name: str  # e.g. "input.embedding", "output.labels", "quality.negative_feedback", "operations.latency_p95_ms"
    group: Group
    status: Status
    value: float | None
    threshold: float | None
    detail: str
    p_value: float | None = None
    n_reference: int = 0
    n_current: int = 0
    extra: dict[str, float | str | None] = field(default_factory=dict)  # e.g. interval bounds, raw rates

    @property
    def fired(self) -> bool:
        return self.status == "alert"


@dataclass(frozen=True)
class Window:
    """The current window: the requests of ``model`` between ``start`` and ``end`` (Unix times)."""

    start: float
    end: float
    requests: int
    first_id: str | None = None
    last_id: str | None = None


@dataclass(frozen=True)
class CheckResult:
    """Every detector's result for one served model version over one window."""

    model: str
    version: int | None  # the production version checked; None: the base model
    dataset_version: str | None  # the reference: the version's training data
    at: float  # Unix time of the check
    window: Window
    results: list[DetectorResult]

    @property
    def fired(self) -> list[DetectorResult]:
        return [r for r in self.results if r.fired]

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["fired"] = [r.name for r in self.fired]
        return out
