"""``tuneline monitor``: check a served model's detectors (and alert), write the monitoring report, and
prune the request log to the spec's retention."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tuneline.cli.console import console, escape, human_output, print_json, setup_logging
from tuneline.cli.exits import EXIT_ALERT_FIRED, EXIT_GATES_FAILED
from tuneline.cli.options import JsonOpt, VerboseOpt, WorkspaceOpt
from tuneline.errors import Problem
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from tuneline.monitor.check import CheckOutcome
    from tuneline.monitor.results import DetectorResult
    from tuneline.monitor.retention import PruneResult, RetentionTarget
    from tuneline.monitor.store import RequestLog
    from tuneline.pipeline.retrain import RetrainResult

group = typer.Typer(help="Watch a served model: drift, quality and operations detectors, alerts, the report.",
                    no_args_is_help=True)

TargetArg = Annotated[str, typer.Argument(
    help="A registered model's NAME (its production version and the spec shipped with it), or a spec file "
         "(its name is the model; its monitor section applies).", metavar="NAME|SPEC", show_default=False)]
LogUrlOpt = Annotated[str | None, typer.Option(
    "--log-url", help="The request log's SQLAlchemy URL (default: $TUNELINE_DATABASE_URL, else the workspace's SQLite requests.db).")]

STATUS_STYLE = {"ok": "[green]ok[/]", "alert": "[bold red]ALERT[/]", "insufficient": "[dim]not enough data[/]",
                "info": "[dim]info[/]"}


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="monitor")


@group.command("check")
def monitor_check(
    target: TargetArg, workspace: WorkspaceOpt = None, log_url: LogUrlOpt = None, as_json: JsonOpt = False,
    retrain_on_alert: Annotated[bool, typer.Option(
        "--retrain-on-alert", help="When a drift or quality detector fires, run `tuneline retrain NAME` "
                                   "(operations alerts alone do not retrain).")] = False,
    no_alerts: Annotated[bool, typer.Option("--no-alerts", help="Store the result but send no alert.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run every detector on the model's current window, print a table, store the result and send
    alerts to the spec's sinks (one per detector per window).

    Exits 4 when a detector fired (and 3 when --retrain-on-alert retrained a candidate whose gates
    failed), 0 otherwise."""
    setup_logging(verbose)
    from tuneline.monitor import check  # lazy: the detectors pull numpy, scipy and the encoder
    from tuneline.monitor.store import RequestLog  # lazy: SQLAlchemy

    ws = Workspace.at(workspace)
    tgt = check.target_of(target, ws)
    store = RequestLog(log_url or ws.requests_url)
    try:
        outcome = check.run_check(tgt, ws, store, send=not no_alerts)
    finally:
        store.close()
    if not as_json:
        _print_check(outcome)
    retrained = None
    if outcome.check.fired and retrain_on_alert and any(r.group != "operations" for r in outcome.check.fired):
        retrained = _retrain(tgt.name, ws, tgt.spec_path, as_json)
    if as_json:
        print_json({**outcome.check.to_dict(), "check_id": outcome.check_id, "alerts": outcome.alerts.to_dict(),
                    "retrain": retrained.to_dict() if retrained is not None else None})
    if retrained is not None and retrained.report is not None and not retrained.report.passed:
        raise typer.Exit(EXIT_GATES_FAILED)
    if outcome.check.fired:
        raise typer.Exit(EXIT_ALERT_FIRED)


def _retrain(name: str, ws: Workspace, spec: Path | None, as_json: bool) -> RetrainResult:
    from tuneline.pipeline.retrain import retrain  # lazy: training stack

    with human_output(as_json) as out:
        out.print(f"a drift or quality detector fired: retraining {escape(name)}")
        return retrain(name, ws, spec=spec, console=out)


def _print_check(outcome: CheckOutcome) -> None:
    check = outcome.check
    w = check.window
    console.print(f"[bold]{escape(check.model)}@{check.version}[/]: {w.requests} requests in the window, "
                  f"reference {check.dataset_version}", soft_wrap=True)
    table = Table(title="detectors")
    for col in ("detector", "status", "value", "threshold", "p", "detail"):
        table.add_column(col)
    for r in check.results:
        table.add_row(r.name, STATUS_STYLE.get(r.status, r.status), _num(r.value), _num(r.threshold),
                      _p(r), escape(r.detail))
    console.print(table)
    for line in outcome.alerts.lines():
        console.print(escape(line), soft_wrap=True)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _p(r: DetectorResult) -> str:
    return "-" if r.p_value is None else f"{r.p_value:.3g}"


@group.command("report")
def monitor_report(
    target: TargetArg, workspace: WorkspaceOpt = None, log_url: LogUrlOpt = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="HTML file to write (default: <workspace>/reports/monitor-<NAME>.html).")] = None,
    days: Annotated[float, typer.Option(help="Checks of the last this many days.")] = 30.0,
    verbose: VerboseOpt = False,
) -> None:
    """Write one self-contained HTML page: each detector's values over time with its threshold,
    the alerts sent, and the current inputs farthest from the training data, grouped.

    Prints the path of the file written. Run `tuneline monitor check` first (by cron or a timer)."""
    setup_logging(verbose)
    from tuneline.monitor import check  # lazy: the detectors pull numpy, scipy and the encoder
    from tuneline.monitor.report import monitor_report_path, write_monitor_report  # lazy: as above
    from tuneline.monitor.store import RequestLog  # lazy: SQLAlchemy

    ws = Workspace.at(workspace)
    tgt = check.target_of(target, ws)
    store = RequestLog(log_url or ws.requests_url)
    try:
        since = time.time() - days * 86400
        checks = store.checks(tgt.name, since=since)
        alerts = store.alerts_sent(tgt.name, since=since)
        drifted = check.drifted_now(tgt, ws, store) if tgt.spec.monitor.input.enabled else None
    finally:
        store.close()
    path = write_monitor_report(out or monitor_report_path(ws, tgt.name), tgt.name, checks, alerts, drifted)
    typer.echo(str(path))


@group.command("prune")
def monitor_prune(
    target: TargetArg, workspace: WorkspaceOpt = None, log_url: LogUrlOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")] = False,
    as_json: JsonOpt = False, verbose: VerboseOpt = False,
) -> None:
    """Delete the model's request-log rows older than the spec's monitor.retention: requests
    (those with feedback still kept stay), feedback, and stored checks and alerts.

    Prints the rows deleted per table. Rows go in short batches, so a server logging into the
    same database keeps going. Every prune (not a dry run) is recorded in the audit trail as
    monitor.prune with the counts. A spec without monitor.retention prunes nothing (exit 0)."""
    setup_logging(verbose)
    from tuneline.monitor import retention  # lazy: monitor.check pulls numpy, scipy and the encoder
    from tuneline.monitor.store import RequestLog  # lazy: SQLAlchemy

    ws = Workspace.at(workspace)
    tgt = retention.retention_target(target, ws)
    if not tgt.retention.enabled:
        message = f"{tgt.where} sets no monitor.retention: nothing to prune (every row is kept)"
        if as_json:
            print_json({"model": tgt.name, "dry_run": dry_run, "retention": None, "message": message})
        else:
            console.print(escape(message), soft_wrap=True)
        return
    store = RequestLog(log_url or ws.requests_url)
    try:
        result = _prune(tgt, ws, store, dry_run)
    finally:
        store.close()
    if as_json:
        print_json(result.to_dict())
    else:
        _print_prune(result)


def _prune(tgt: RetentionTarget, ws: Workspace, store: RequestLog, dry_run: bool) -> PruneResult:
    """Prune (a dry run: count), and record a real prune in the audit trail, with what it had
    deleted when it failed."""
    from tuneline.audit import trail_of  # lazy: SQLAlchemy
    from tuneline.monitor import retention  # lazy: as in monitor_prune
    from tuneline.monitor.check import MonitorError  # lazy: as above
    from tuneline.monitor.store import RequestLogError  # lazy: SQLAlchemy

    result = retention.new_result(tgt, time.time(), dry_run)
    try:
        if dry_run:
            return retention.prune(tgt, store, dry_run=True, result=result)
        trail = trail_of(ws)
        try:
            inputs = {"spec": tgt.spec_sha256} if tgt.spec_sha256 else {}
            with trail.action("monitor.prune", subject=f"model:{tgt.name}", inputs=inputs) as pending:
                try:
                    retention.prune(tgt, store, result=result)
                finally:
                    pending.details.update(result.audit_details())
        finally:
            trail.close()
    except RequestLogError as exc:
        done = ", ".join(f"{n} {t}" for t, n in result.counts.items() if n and t in retention.TABLES)
        raise MonitorError(Problem(f"{exc}" + (f" (deleted before the error: {done})" if done else ""),
                                   hint="check --log-url (or the workspace's requests.db) and run the prune again: "
                                        "it goes on where it stopped")) from exc
    return result


def _print_prune(result: PruneResult) -> None:
    verb = "would delete" if result.dry_run else "deleted"
    cutoffs = result.cutoffs_utc()
    table = Table(title=f"{escape(result.model)}: {verb}")
    for col in ("table", "kept for", "rows older than", verb):
        table.add_column(col)
    for name, group in (("requests", "requests"), ("feedback", "feedback"), ("checks", "checks"), ("alerts", "checks")):
        days = result.retention[f"{group}_days"]
        table.add_row(name, "for ever" if days is None else f"{days:g} days", cutoffs[group] or "-",
                      str(result.counts.get(name, 0)))
    console.print(table)
    kept = result.counts.get("requests_kept_for_feedback", 0)
    if kept:
        console.print(f"{kept} older requests kept: feedback on them is still kept", soft_wrap=True)
    console.print(f"{verb} {result.deleted} rows" + (" (dry run: nothing deleted)" if result.dry_run else ""),
                  soft_wrap=True)
