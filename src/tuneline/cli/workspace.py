"""What the workspace holds: ``pull`` (a base model, converted once) and ``runs`` (tracked runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tuneline.cli.console import console, print_json, setup_logging
from tuneline.cli.options import JsonOpt, UriOpt, WorkspaceOpt
from tuneline.models import ensure_converted, resolve_model_source
from tuneline.tracking import list_runs
from tuneline.workspace import Workspace


def register(app: typer.Typer) -> None:
    app.command()(pull)
    app.command()(runs)


def pull(
    model: Annotated[str, typer.Argument(help="Built-in alias, .gguf file, local directory or hub id.")] = "smollm2-135m",
    workspace: WorkspaceOpt = None,
) -> None:
    """Prepare a base model in the workspace ahead of a run (a GGUF is converted once and cached)."""
    setup_logging(False)
    source = resolve_model_source(model, Path.cwd())
    if source.is_gguf:
        target = ensure_converted(source, Workspace.at(workspace).models_dir)
        console.print(f"[green]ready[/] {model}: {target}", soft_wrap=True)
    else:
        console.print(f"[green]ready[/] {model}: loaded as it is ({source.path or source.ref}), nothing to convert",
                      soft_wrap=True)


def runs(
    workspace: WorkspaceOpt = None,
    uri: UriOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many runs.")] = 20,
    as_json: JsonOpt = False,
    trials: Annotated[bool, typer.Option("--trials", help="Also list search trials (child runs).")] = False,
) -> None:
    """List tracked runs, newest first, with their key metrics (search trials with --trials)."""
    rows = list_runs(Workspace.at(workspace), uri=uri, max_results=limit, include_trials=trials)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no runs yet: start one with `tuneline run SPEC`")
        return
    table = Table(title="tuneline runs")
    for col in ("run id", "experiment", "status", "steps", "base", "candidate", "gates"):
        table.add_column(col)
    for r in rows:
        m, t = r["metrics"], r["tags"]
        primary = "accuracy" if "candidate.accuracy" in m or "base.accuracy" in m else "rouge_l"
        table.add_row(r["run_id"][:12], r["experiment"], r["status"], str(int(m["steps"])) if "steps" in m else "-",
                      f"{primary} {_fmt(m, 'base.' + primary)}", f"{primary} {_fmt(m, 'candidate.' + primary)}",
                      {"true": "[green]pass[/]", "false": "[red]fail[/]"}.get(t.get("tuneline.objective_passed", ""), "-"))
    console.print(table)


def _fmt(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else "-"
