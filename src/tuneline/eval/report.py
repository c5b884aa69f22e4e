"""Evaluation reports: metrics per model side by side, objective thresholds checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tuneline.spec.models import ObjectiveSpec


@dataclass
class ModelResult:
    name: str  # "base" or "tuned"
    metrics: dict[str, float]
    seconds_per_example: float
    predictions: list[str] = field(default_factory=list)


@dataclass
class ThresholdCheck:
    threshold: str
    metric: str
    observed: float | None
    passed: bool


@dataclass
class EvalReport:
    task: str
    primary: str
    n_examples: int
    results: list[ModelResult]
    checks: list[ThresholdCheck]
    references: list[str] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def result(self, name: str) -> ModelResult | None:
        return next((r for r in self.results if r.name == name), None)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        if not with_predictions:
            d.pop("references")
            d.pop("wheres")
            for r in d["results"]:
                r.pop("predictions")
        return d

    def prediction_rows(self) -> list[dict[str, str]]:
        rows = []
        for i, (where, ref) in enumerate(zip(self.wheres, self.references, strict=True)):
            row = {"where": where, "reference": ref}
            row.update({r.name: r.predictions[i] for r in self.results})
            rows.append(row)
        return rows


def check_objective(objective: ObjectiveSpec, metrics: dict[str, float]) -> list[ThresholdCheck]:
    """Check each threshold against the tuned model's metrics."""
    checks = []
    for t in objective.parsed_thresholds():
        observed = metrics.get(t.metric)
        checks.append(ThresholdCheck(str(t), t.metric, observed, observed is not None and t.check(observed)))
    return checks


def render_table(report: EvalReport) -> Any:
    """A rich Table: each metric with base and tuned values, the change, and threshold pass/fail."""
    from rich.table import Table

    names = [r.name for r in report.results]
    table = Table(title=f"Evaluation on {report.n_examples} held-out examples ({report.task})")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    if "base" in names and "tuned" in names:
        table.add_column("change", justify="right")
    table.add_column("objective")
    metrics = list(report.results[-1].metrics)
    by_metric = {c.metric: c for c in report.checks}
    for m in metrics:
        vals = [r.metrics.get(m) for r in report.results]
        row = [m + (" *" if m == report.primary else "")] + [f"{v:.4f}" if v is not None else "-" for v in vals]
        if "base" in names and "tuned" in names:
            b, t = report.result("base"), report.result("tuned")
            assert b is not None and t is not None
            row.append(f"{t.metrics[m] - b.metrics[m]:+.4f}")
        c = by_metric.get(m)
        row.append("" if c is None else (f"[green]PASS[/] {c.threshold}" if c.passed else f"[red]FAIL[/] {c.threshold}"))
        table.add_row(*row)
    lat = ["latency ms/example"] + [f"{1000 * r.seconds_per_example:.1f}" for r in report.results]
    if "base" in names and "tuned" in names:
        lat.append("")
    table.add_row(*lat, "")
    return table
