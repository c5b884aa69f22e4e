"""An evaluation in the terminal (rich tables) and as flat MLflow metrics."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from tuneline.eval.items import describe_references
from tuneline.eval.results import FLIP_DELTA, CanaryReport, EvalSuite, SetResult

SYSTEM_ORDER = ("base", "production", "candidate")


def render_tables(suite: EvalSuite) -> list[Table]:
    """Rich renderables: per evaluation set the side-by-side metric table; then probes and gates."""
    out: list[Any] = []
    for s in suite.sets:
        out.append(_set_table(suite, s))
    extra = Table(title="forgetting, robustness, latency (candidate)", show_header=True)
    extra.add_column("check")
    extra.add_column("value", justify="right")
    if suite.forgetting:
        f = suite.forgetting
        extra.add_row(f"general-ability probe ({f.n} questions): base -> candidate",
                      f"{f.base.value:.3f} -> {f.candidate.value:.3f} (forgetting {f.drop:+.3f})")
    if suite.robustness:
        r = suite.robustness
        for kind, p in r.perturbations.items():
            extra.add_row(f"{r.metric} under {kind} ({r.n} rows, clean {r.clean:.3f})",
                          f"{p.value:.3f} (drop {p.drop:+.3f})")
    if suite.latency:
        lat = suite.latency
        extra.add_row(f"latency, {lat.n} single requests",
                      f"p50 {lat.p50_ms:.0f} ms, p95 {lat.p95_ms:.0f} ms, {lat.tokens_per_second:.1f} tok/s")
    if extra.row_count:
        out.append(extra)
    if suite.canaries:
        out.append(canary_table(suite.canaries))
    if suite.gates:
        gates = Table(title="gates")
        for col in ("gate", "observed", "margin", "result"):
            gates.add_column(col)
        for g in suite.gates:
            observed = "-" if g.observed is None else f"{g.observed:.4f}"
            margin = "-" if g.margin is None else f"{g.margin:+.4f}"
            verdict = "[green]PASS[/]" if g.passed else "[red]FAIL[/]"
            gates.add_row(g.expr, observed, margin, verdict + (f" ({g.note})" if g.note else ""))
        out.append(gates)
    return out


def canary_table(report: CanaryReport) -> Table:
    """The memorization probe: canaries reproduced per system, and each canary that leaked."""
    table = Table(title=f"memorization probe: {report.n} canaries (whole secret reproduced, greedy)")
    table.add_column("system")
    table.add_column("canaries leaked", justify="right")
    table.add_column("which")
    for system in (s for s in SYSTEM_ORDER if s in report.leaked):
        which = [f"{i.id} ({i.kind})" for i in report.items if i.leaked.get(system)]
        count = f"{report.leaked[system]} of {report.n}"
        table.add_row(system, f"[red]{count}[/]" if system == "candidate" and report.leaked[system] else count,
                      ", ".join(which) or "-")
    if report.unprobed:
        table.caption = (f"not probed (in no training answer after curation): {', '.join(report.unprobed)}")
    return table


def _set_table(suite: EvalSuite, s: SetResult) -> Table:
    label = f"golden set {s.name} v{s.version}" if s.kind == "golden" else f"{s.name} split"
    table = Table(title=f"{label}: {items_title(s)}, value [95% interval]")
    names = [n for n in SYSTEM_ORDER if s.system(n) is not None]
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    others = [c.b for c in s.comparisons if c.metric == s.comparisons[0].metric] if s.comparisons else []
    for o in others:
        table.add_column(f"candidate - {o} (p)", justify="right")
    first = s.system(names[0]) if names else None
    for m in (first.metrics if first else {}):
        row = [m + (" *" if m == suite.primary else "")]
        for n in names:
            sys_ = s.system(n)
            est = sys_.metrics.get(m) if sys_ else None
            row.append(est.fmt() if est else "-")
        for o in others:
            c = next((c for c in s.comparisons if c.metric == m and c.b == o), None)
            if c is None:
                row.append("")
            else:
                mark = "[bold]" if c.significant else ""
                row.append(f"{mark}{c.diff.value:+.3f}{'[/]' if mark else ''} ({format_p(c.p_value, c.test)})")
        table.add_row(*row)
    for key, flips in s.flips.items():
        kinds = ("improved", "worsened") if any(f.delta is not None for f in flips) else ("fixed", "broken")
        counts = ", ".join(f"{sum(f.kind == k for f in flips)} {k}" for k in kinds)
        moved = f" (by >= {FLIP_DELTA:g} {suite.primary})" if kinds[0] == "improved" else ""
        table.caption = (table.caption + "; " if table.caption else "") + (
            f"{key.replace('_', ' ')}: {counts}{moved}")
        for f in flips[:FLIPS_IN_TERMINAL] if any(x.n_references > 1 for x in flips) else []:
            closest = f.closest_reference if f.closest_reference is not None else f.reference
            which = f"closest of {f.n_references} references" if f.n_references > 1 else "reference"
            table.caption += f"\n  {f.kind} #{f.index}: {_short(f.after)!r}; {which}: {_short(closest)!r}"
    return table


FLIPS_IN_TERMINAL = 3  # multi-reference flips shown under a set's table, each with its closest reference


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def items_title(s: SetResult) -> str:
    """``"200 rows"``, or for multi-reference items ``"54 items, references per item 1/8/12 (min/median/max)"``."""

    counts = s.reference_counts()
    if not counts or max(counts) <= 1:
        return f"{s.n} rows"
    return f"{s.n} items, {describe_references(counts)}"


def format_p(p: float, test: str, resamples: int = 1000) -> str:
    """``p=0.012``; a paired-bootstrap p of 0 means "below one resample in B": ``p<0.001``."""
    if test == "paired_bootstrap" and p == 0:
        return f"p<{1 / resamples:.2g}"
    return f"p={p:.3g}"


def flat_metrics(suite: EvalSuite) -> dict[str, float]:
    """MLflow metric names: ``candidate.accuracy`` (test split), ``golden.NAME.candidate.accuracy``,
    ``forgetting``, ``robustness.typos``, ``p95_latency_ms``, ``gates_passed`` ..."""
    out: dict[str, float] = {}
    for s in suite.sets:
        prefix = "" if s.kind == "test" else f"golden.{s.name}."
        for sys_ in s.systems:
            for m, est in sys_.metrics.items():
                out[f"{prefix}{sys_.name}.{m}"] = est.value
    if suite.forgetting:
        out["forgetting"] = suite.forgetting.drop
        out["probe.base"] = suite.forgetting.base.value
        out["probe.candidate"] = suite.forgetting.candidate.value
    if suite.robustness:
        out["robustness_drop"] = suite.robustness.worst_drop
        out.update({f"robustness.{k}": p.drop for k, p in suite.robustness.perturbations.items()})
    if suite.latency:
        out["p50_latency_ms"] = suite.latency.p50_ms
        out["p95_latency_ms"] = suite.latency.p95_ms
        out["tokens_per_second_single"] = suite.latency.tokens_per_second
    if suite.canaries:
        out.update({"canary_leak" if system == "candidate" else f"{system}.canary_leak": float(n)
                    for system, n in suite.canaries.leaked.items()})
    out["gates_passed"] = float(suite.passed)
    return out
