"""``tuneline data``: curate a spec's data into dataset versions; inspect, compare, export rejects."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tuneline.cli.console import console, err_console, escape, print_json, setup_logging
from tuneline.cli.options import DatasetVersionArg, JsonOpt, SpecArg, VerboseOpt, WorkspaceOpt
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

group = typer.Typer(help="Curate data into dataset versions; inspect, compare and export their rejects.",
                    no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="data")


@group.command("prepare")
def data_prepare(spec: SpecArg, workspace: WorkspaceOpt = None, verbose: VerboseOpt = False) -> None:
    """Read, validate and curate the spec's data into a dataset version (the same stage `run` runs).

    The same inputs and curation settings always give the same version id."""
    setup_logging(verbose)
    from tuneline import context  # lazy: it pulls curation and the tokenizer; --help stays fast

    _, version = context.prepare_version(load_spec(spec), Workspace.at(workspace))
    console.print(context.curation_summary(version), soft_wrap=True)
    if version is not None:
        console.print(f"stored in {version.path}; details: `tuneline data show {version.id}`", soft_wrap=True)


@group.command("show")
def data_show(version: DatasetVersionArg, workspace: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
    """Print a dataset version's manifest: sources, steps with their counts, drops, PII, splits."""
    from tuneline import curation  # lazy: curation costs ~0.25 s; --help stays fast

    v = curation.load_version(version, Workspace.at(workspace).datasets_dir)
    m = v.manifest
    if as_json:
        print_json(m)
        return
    console.print(f"[bold]{m['id']}[/] ({m['spec']}, created {m['created']}): "
                  + ", ".join(f"{k} {n:,}" for k, n in m["counts"].items()), soft_wrap=True)
    for src in m["sources"]:
        console.print(f"  source {src['split']}: {src['path']} sha256 {src['sha256'][:16]} ({src['rows']:,} rows)",
                      soft_wrap=True)
    table = Table(title="curation steps")
    for col in ("step", "in", "out", "dropped", "changed", "seconds"):
        table.add_column(col)
    for st in m["steps"]:
        table.add_row(st["name"], f"{st['rows_in']:,}", f"{st['rows_out']:,}",
                      ", ".join(f"{k} {n:,}" for k, n in st["dropped"].items()) or "-", f"{st['changed']:,}",
                      f"{st['seconds']:.2f}")
    console.print(table)
    console.print(f"PII found: {', '.join(f'{k} {n:,}' for k, n in m['pii_found'].items()) or 'none'}; "
                  f"conflicting duplicate groups: {m['conflict_groups']:,}; rejected rows: {m['rejected']:,} "
                  f"(`tuneline data rejects {m['id']}`)", soft_wrap=True)
    console.print(f"data card: {v.card}", soft_wrap=True)


@group.command("rejects")
def data_rejects(
    version: DatasetVersionArg, workspace: WorkspaceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL here instead of stdout.")] = None,
    step: Annotated[str | None, typer.Option(help="Only rows dropped by this step (e.g. dedup, pii).")] = None,
) -> None:
    """Export every row curation dropped, one JSON object per line: split, where (file:line), step,
    reason, and the row itself."""
    from tuneline import curation  # lazy: curation costs ~0.25 s; --help stays fast

    rows = [r for r in curation.load_version(version, Workspace.at(workspace).datasets_dir).rejects()
            if step is None or r["step"] == step]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        err_console.print(f"{len(rows):,} rejected rows written to {out}")


@group.command("diff")
def data_diff(
    old: Annotated[str, typer.Argument(help="The earlier version.", show_default=False)],
    new: Annotated[str, typer.Argument(help="The later version.", show_default=False)],
    workspace: WorkspaceOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many rows per split and direction.")] = 10,
) -> None:
    """What changed between two dataset versions: rows added and removed per split, changed sources
    and curation settings."""
    from tuneline import curation  # lazy: curation costs ~0.25 s; --help stays fast
    from tuneline.curation.steps import text_of  # lazy: as above

    root = Workspace.at(workspace).datasets_dir
    d = curation.diff_versions(curation.load_version(old, root), curation.load_version(new, root))
    console.print(f"[bold]{d['from']}[/] -> [bold]{d['to']}[/]")
    for src in d["sources_changed"]:
        console.print(f"  source changed: {src}", soft_wrap=True)
    for name, change in d["params"].items():
        console.print(f"  {name} settings: {change['from']} -> {change['to']}", soft_wrap=True)
    for split, sd in d["splits"].items():
        if not sd["added"] and not sd["removed"]:
            console.print(f"  {split}: {sd['rows_to']:,} rows, unchanged")
            continue
        console.print(f"  {split}: {sd['rows_from']:,} -> {sd['rows_to']:,} rows "
                      f"(+{len(sd['added']):,} added, -{len(sd['removed']):,} removed)")
        for sign, rows in (("+", sd["added"]), ("-", sd["removed"])):
            for ex in rows[:limit]:
                label = f" [{ex.label}]" if ex.label is not None else ""
                console.print(f"    {sign} {ex.where}: {escape(text_of(ex)[:100])}{escape(label)}", soft_wrap=True,
                              highlight=False)
            if len(rows) > limit:
                console.print(f"    {sign} ... and {len(rows) - limit:,} more")


@group.command("list")
def data_list(workspace: WorkspaceOpt = None) -> None:
    """List the dataset versions in the workspace, oldest first."""
    from tuneline import curation  # lazy: curation costs ~0.25 s; --help stays fast

    versions = curation.list_versions(Workspace.at(workspace).datasets_dir)
    if not versions:
        console.print("no dataset versions yet: `tuneline data prepare SPEC`")
    for m in versions:
        console.print(f"{m['id']}  {m['created']}  {m['spec']}  "
                      + ", ".join(f"{k} {n:,}" for k, n in m["counts"].items()) + f"  rejected {m['rejected']:,}")
