"""``tuneline audit``: verify the hash-chained audit trail, print it, export it for auditors."""

from __future__ import annotations

import csv
import io
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tuneline.cli.console import console, err_console, escape, print_json
from tuneline.cli.exits import EXIT_ERROR
from tuneline.cli.options import JsonOpt, WorkspaceOpt
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from tuneline.audit import AuditTrail, Entry

group = typer.Typer(help="The audit trail: every action that changed state, hash-chained.", no_args_is_help=True)

UrlOpt = Annotated[str | None, typer.Option(
    "--url", help="The audit store's SQLAlchemy URL (default: $TUNELINE_AUDIT_URL, else $TUNELINE_DATABASE_URL, else the workspace's audit.db).")]
SinceOpt = Annotated[str | None, typer.Option(help="Only entries at or after this UTC date or time (YYYY-MM-DD[THH:MM]).")]
ActionOpt = Annotated[str | None, typer.Option(help="Only this action and its sub-actions (e.g. `promote`, `data`).")]
EXPORT_FIELDS = ("seq", "at", "actor", "action", "subject", "inputs", "outputs", "result", "details", "prev", "hash")


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="audit")


def _trail(workspace: Path | None, url: str | None) -> AuditTrail:
    from tuneline.audit import AuditTrail, trail_of  # lazy: SQLAlchemy

    return AuditTrail(url) if url else trail_of(Workspace.at(workspace))


@group.command("verify")
def audit_verify(workspace: WorkspaceOpt = None, url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Walk the chain from the first entry: each entry must match its hash and hold its predecessor's,
    the numbers must run without a gap, and the last entry must be the recorded head. Exits 1 and
    names the first broken link when one is found."""
    trail = _trail(workspace, url)
    result = trail.verify()
    if as_json:
        print_json({"ok": result.ok, "entries": result.entries, "head": result.head, "broken": result.broken,
                    "seq": result.seq, "store": trail.url})
    elif result.ok:
        console.print(f"[green]audit trail intact[/]: {result.entries:,} entries; head {result.head or '-'} "
                      f"({trail.url})", soft_wrap=True)
    else:
        err_console.print(f"[bold red]audit trail broken[/]: {escape(result.broken or '')} ({trail.url})", soft_wrap=True)
    if not result.ok:
        raise typer.Exit(EXIT_ERROR)


@group.command("log")
def audit_log(
    workspace: WorkspaceOpt = None, url: UrlOpt = None, since: SinceOpt = None, action: ActionOpt = None,
    ref: Annotated[str | None, typer.Option(
        help="Only entries that act on or produce this id (a run id, dataset version, NAME/VERSION, ...).")] = None,
    head: Annotated[bool, typer.Option("--head", help="Print only the head: the last entry's number and hash.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the audit entries, oldest first: when, who, what, on what, the result."""
    trail = _trail(workspace, url)
    if head:
        h = trail.head()
        if as_json:
            print_json({"seq": h[0], "hash": h[1]} if h else None)
        else:
            console.print(f"{h[0]} {h[1]}" if h else "no entries yet")
        return
    entries = trail.entries(since=since, action=action, refs=[ref] if ref else None)
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    if not entries:
        console.print("no audit entries" + (" match" if since or action or ref else " yet"))
        return
    table = Table(title=f"audit trail ({trail.url})")
    for col in ("#", "at (UTC)", "actor", "action", "subject", "result", "inputs -> outputs", "details"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(str(e.seq), e.at[:19].replace("T", " "), e.actor, e.action, e.subject, _result(e.result),
                      _io(e), escape(_details(e)))
    console.print(table)


def _result(result: str) -> str:
    return {"ok": "[green]ok[/]", "failed": "[red]failed[/]", "refused": "[yellow]refused[/]"}.get(result, result)


def _short(value: str) -> str:
    """A SHA-256 (bare or ``sha256:``-prefixed) as its first 12 digits; anything else as it is."""
    prefix, _, digest = value.rpartition(":")
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return f"{prefix}:{digest[:12]}" if prefix else digest[:12]
    return value


def _io(e: Entry) -> str:
    ins = ", ".join(f"{k} {_short(v)}" for k, v in e.inputs.items())
    outs = ", ".join(f"{k} {_short(v)}" for k, v in e.outputs.items())
    return f"{ins or '-'} -> {outs or '-'}"


def _details(e: Entry) -> str:
    return ", ".join(f"{k}={v}" for k, v in e.details.items())


@group.command("export")
def audit_export(
    workspace: WorkspaceOpt = None, url: UrlOpt = None, since: SinceOpt = None, action: ActionOpt = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="jsonl: one entry per line, as hashed; csv: "
                                                               "inputs, outputs and details as JSON cells.")
                   ] = ExportFormat.jsonl,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Export entries for an auditor, with their hashes, so the chain can be checked outside tuneline
    (entry n's `prev` is entry n-1's `hash`; see docs/governance.md for how the hash is computed)."""
    entries = _trail(workspace, url).entries(since=since, action=action)
    text = _jsonl(entries) if fmt is ExportFormat.jsonl else _csv(entries)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        err_console.print(f"{len(entries):,} audit entries written to {out}")


def _jsonl(entries: list[Entry]) -> str:
    return "".join(json.dumps(e.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for e in entries)


def _csv(entries: list[Entry]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(EXPORT_FIELDS)
    for e in entries:
        d = e.to_dict()
        writer.writerow([json.dumps(d[k], ensure_ascii=False, sort_keys=True) if isinstance(d[k], dict) else d[k]
                         for k in EXPORT_FIELDS])
    return buf.getvalue()
