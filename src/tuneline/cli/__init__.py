"""The ``tuneline`` command line. Each command parses its arguments and calls the Python API.

Heavy libraries (torch, transformers, mlflow) are imported inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tuneline.errors import TunelineError

app = typer.Typer(
    name="tuneline",
    help="Fine-tune language models from one spec: data -> LoRA training -> evaluation -> tracking.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="Path to a tuneline.yaml spec.", show_default=False)]
WorkspaceOpt = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace folder (default: $TUNELINE_HOME or ./.tuneline)."),
]


def _setup_logging(verbose: bool) -> None:
    import warnings

    from rich.logging import RichHandler

    # deprecation chatter from transformers/peft internals says nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning)

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)], force=True)
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
    spec: SpecArg,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of this spec's run.")] = False,
    workspace: WorkspaceOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars (log lines instead).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the pipeline: validate data, evaluate the base model, train, evaluate, track.

    Exits 0 when the objective's thresholds pass, 2 when they fail, 1 on an error.
    """
    _setup_logging(verbose)
    from tuneline.pipeline import run as run_pipeline

    result = run_pipeline(spec, workspace=workspace, resume=resume, show_progress=not no_progress, console=console)
    if result.report is not None and not result.report.passed:
        raise typer.Exit(2)


@app.command()
def validate(spec: SpecArg) -> None:
    """Check a spec and every row of its data; report all problems at once. Trains nothing."""
    from tuneline.pipeline import validate as validate_spec

    loaded, data = validate_spec(spec)
    parts = ", ".join(f"{s.split}: {s.rows_used} rows ({s.path})" for s in data.sources)
    labels = f"; {len(data.labels)} labels" if data.labels else ""
    console.print(f"[green]ok[/] {loaded.path.name}: {loaded.spec.name} ({loaded.spec.task.type}); {parts}{labels}")


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="Built-in alias, .gguf file, local directory or hub id.")] = "smollm2-135m",
    workspace: WorkspaceOpt = None,
) -> None:
    """Prepare a base model in the workspace ahead of a run (a GGUF is converted once and cached)."""
    _setup_logging(False)
    from tuneline.models import ensure_converted, resolve_model_source
    from tuneline.workspace import Workspace

    source = resolve_model_source(model, Path.cwd())
    if source.is_gguf:
        target = ensure_converted(source, Workspace.at(workspace).models_dir)
        console.print(f"[green]ready[/] {model}: {target}", soft_wrap=True)
    else:
        console.print(f"[green]ready[/] {model}: loaded as it is ({source.path or source.ref}), nothing to convert",
                      soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of tuneline.yaml (for editor completion and validation)."""
    from tuneline.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def runs(
    workspace: WorkspaceOpt = None,
    uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: the workspace's SQLite store).")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List tracked runs, newest first, with their key metrics."""
    from rich.table import Table

    from tuneline.tracking import list_runs
    from tuneline.workspace import Workspace

    rows = list_runs(Workspace.at(workspace), uri=uri, max_results=limit)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if not rows:
        console.print("no runs yet: start one with `tuneline run SPEC`")
        return
    table = Table(title="tuneline runs")
    for col in ("run id", "experiment", "status", "steps", "base", "tuned", "objective"):
        table.add_column(col)
    for r in rows:
        m, t = r["metrics"], r["tags"]
        primary = "accuracy" if "tuned.accuracy" in m or "base.accuracy" in m else "rouge_l"
        table.add_row(r["run_id"][:12], r["experiment"], r["status"], str(int(m["steps"])) if "steps" in m else "-",
                      f"{primary} {_fmt(m, 'base.' + primary)}", f"{primary} {_fmt(m, 'tuned.' + primary)}",
                      {"true": "[green]pass[/]", "false": "[red]fail[/]"}.get(t.get("tuneline.objective_passed", ""), "-"))
    console.print(table)


def _fmt(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else "-"


def main() -> None:
    """Entry point: turn tuneline errors into a clear message and exit code 1."""
    try:
        app()
    except TunelineError as exc:
        err_console.print(f"[bold red]error:[/] {_escape(exc.render())}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: the last checkpoint is kept; continue with `tuneline run SPEC --resume`")
        sys.exit(130)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
