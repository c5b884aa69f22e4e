"""``tuneline data``: curate a spec's data into dataset versions; inspect, compare, export rejects."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tuneline.cli.console import console, err_console, escape, print_json, setup_logging
from tuneline.cli.options import (
    DatasetVersionArg,
    JsonOpt,
    SpecArg,
    UriOpt,
    VerboseOpt,
    WorkspaceOpt,
)
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from tuneline.pipeline.forget import ForgetResult

group = typer.Typer(help="Curate data into dataset versions; inspect, compare and export their rejects; erase rows.",
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


@group.command("pull")
def data_pull(version: DatasetVersionArg, workspace: WorkspaceOpt = None, uri: UriOpt = None,
              as_json: JsonOpt = False) -> None:
    """Fetch a dataset version a run logged to the tracking store (another machine's, in team mode)
    into this workspace, checked against its id; `tuneline run SPEC --dataset ID` trains on it."""
    from tuneline import context  # lazy: it pulls curation and mlflow; --help stays fast

    ws = Workspace.at(workspace)
    had = (ws.datasets_dir / version).is_dir()
    v = context.stored_version(version, ws, uri or ws.tracking_uri)
    if as_json:
        print_json({"id": v.id, "path": str(v.path), "fetched": not had, "counts": v.manifest["counts"]})
        return
    console.print(("already here: " if had else "fetched: ") + context.curation_summary(v), soft_wrap=True)
    console.print(f"stored in {v.path}; train on it with `tuneline run SPEC --dataset {v.id}`", soft_wrap=True)


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


@group.command("forget")
def data_forget(
    match: Annotated[str | None, typer.Option(
        "--match", metavar="COLUMN=VALUE",
        help="Erase rows whose COLUMN equals VALUE (case, spacing and Unicode forms ignored). COLUMN: prompt "
             "(or text, instruction, source), answer (or response, summary, target, correction), label, messages "
             "(any turn).")] = None,
    contains: Annotated[str | None, typer.Option(
        "--contains", metavar="TEXT", help="Erase rows any text field of which holds TEXT (case, spacing and "
                                           "Unicode forms ignored).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be removed (the matching text on "
                                                            "this terminal only); change nothing.")] = False,
    spec: Annotated[list[Path] | None, typer.Option(
        "--spec", help="Also scan this spec's source files for lines that still match (repeatable).")] = None,
    requests: Annotated[str | None, typer.Option(
        help="The request log's URL (default: $TUNELINE_DATABASE_URL, else the workspace's requests.db).")] = None,
    workspace: WorkspaceOpt = None, uri: UriOpt = None, as_json: JsonOpt = False,
) -> None:
    """Erase rows (an erasure request, e.g. GDPR art. 17): from every dataset version, the request
    and feedback log and the harvested feedback; keep them out of later versions; mark the model
    versions trained on them (retrain those with `tuneline retrain NAME`)."""
    from tuneline.curation.erasure import parse_query  # lazy: curation costs ~0.25 s
    from tuneline.pipeline.forget import forget  # lazy: the pipeline and mlflow; --help stays fast

    query = parse_query(match, contains)
    result = forget(Workspace.at(workspace), query, dry_run=dry_run, uri=uri, requests_url=requests,
                    specs=tuple(spec or ()))
    if as_json:
        print_json({"erasure": None if dry_run else result.erasure_id, "dry_run": dry_run, **result.counts(),
                    "dataset_versions": result.affected, "sources": result.sources, "residue": result.residue,
                    "models": [{"name": m.name, "version": m.version, "erasures": m.erasures}
                               for m in result.models]})
        return
    _print_forget(result)


def _print_forget(result: ForgetResult) -> None:
    p = console.print
    head = "[yellow]dry run[/]: would remove" if result.dry_run else f"[green]erasure {result.erasure_id}[/]: removed"
    p(f"{head} {result.query.describe()}", soft_wrap=True)
    if result.fetched:
        p(f"  fetched from the tracking store, to erase there too: {len(result.fetched)} dataset versions "
          "other machines logged", soft_wrap=True)
    shown: list[str] = []
    for v in result.versions:
        rows = ", ".join(f"{k} {n:,}" for k, n in v.removed.items() if n) or "no split rows"
        other = "".join(f", {name} {n:,}" for name, n in v.other_rows.items())
        p(f"  dataset {v.id}: {rows}; rejects {v.rejects:,}; conflict groups {v.conflicts:,}{other}"
          + (f"; MLflow copies {v.artifacts}" if v.artifacts else ""), soft_wrap=True)
        shown += v.shown
    if not result.versions:
        p("  dataset versions: none hold matching rows")
    if result.log is not None:
        p(f"  request log: {result.log.requests:,} requests, {result.log.feedback:,} feedback entries", soft_wrap=True)
        shown += result.log.shown
    for path, n in result.files.items():
        p(f"  {escape(path)}: {n:,} lines", soft_wrap=True)
    if result.stems:
        p(f"  stored frozen-layer states (stems/, computed from training rows; recomputed when needed): {result.stems}",
          soft_wrap=True)
    if result.dry_run:
        for text in shown[:50]:
            p(f"    - {escape(text[:200])}", soft_wrap=True, highlight=False)
        if len(shown) > 50:
            p(f"    ... and {len(shown) - 50:,} more")
    _print_followups(result)


def _print_followups(result: ForgetResult) -> None:
    """The model versions marked, the source lines and workspace files that still match."""
    p = console.print
    if result.models:
        verb = "were trained on" if result.dry_run else "marked: trained on"
        p(f"model versions {verb} erased rows (run `tuneline retrain NAME` for a clean version):")
        for m in result.models:
            p(f"  {m.name} version {m.version} (dataset {m.tags.get('tuneline.dataset_version')}"
              f"{', aliases ' + ', '.join(m.aliases) if m.aliases else ''})", soft_wrap=True)
    if result.sources:
        p("[yellow]source lines that hold matching rows[/] (tuneline does not edit your files: remove them there; "
          "later dataset versions drop such rows meanwhile):")
        for where in result.sources[:50]:
            p(f"  {escape(where)}", soft_wrap=True)
    if result.residue:
        p("[yellow]other workspace files still holding matching text[/] (evaluation reports, copies): delete or "
          "regenerate them:")
        for path in result.residue:
            p(f"  {escape(path)}", soft_wrap=True)
