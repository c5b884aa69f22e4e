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


data_app = typer.Typer(help="Curate data into dataset versions; inspect, compare and export their rejects.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
VersionArg = Annotated[str, typer.Argument(help="Dataset version id (or a unique prefix of it).", show_default=False)]


@data_app.command("prepare")
def data_prepare(spec: SpecArg, workspace: WorkspaceOpt = None,
                 verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Read, validate and curate the spec's data into a dataset version (the same stage `run` runs).

    The same inputs and curation settings always give the same version id."""
    _setup_logging(verbose)
    from tuneline.pipeline import curation_summary, prepare_version
    from tuneline.spec import load_spec
    from tuneline.workspace import Workspace

    loaded = load_spec(spec)
    data, version = prepare_version(loaded, Workspace.at(workspace))
    console.print(curation_summary(data, version), soft_wrap=True)
    if version is not None:
        console.print(f"stored in {version.path}; details: `tuneline data show {version.id}`", soft_wrap=True)


@data_app.command("show")
def data_show(version: VersionArg, workspace: WorkspaceOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False) -> None:
    """Print a dataset version's manifest: sources, steps with their counts, drops, PII, splits."""
    from rich.table import Table

    from tuneline.curation import load_version
    from tuneline.workspace import Workspace

    v = load_version(version, Workspace.at(workspace).datasets_dir)
    m = v.manifest
    if as_json:
        sys.stdout.write(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
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


@data_app.command("rejects")
def data_rejects(
    version: VersionArg, workspace: WorkspaceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL here instead of stdout.")] = None,
    step: Annotated[str | None, typer.Option(help="Only rows dropped by this step (e.g. dedup, pii).")] = None,
) -> None:
    """Export every row curation dropped, one JSON object per line: split, where (file:line), step,
    reason, and the row itself."""
    from tuneline.curation import load_version
    from tuneline.workspace import Workspace

    rows = [r for r in load_version(version, Workspace.at(workspace).datasets_dir).rejects()
            if step is None or r["step"] == step]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        err_console.print(f"{len(rows):,} rejected rows written to {out}")


@data_app.command("diff")
def data_diff(
    old: Annotated[str, typer.Argument(help="The earlier version.", show_default=False)],
    new: Annotated[str, typer.Argument(help="The later version.", show_default=False)],
    workspace: WorkspaceOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many rows per split and direction.")] = 10,
) -> None:
    """What changed between two dataset versions: rows added and removed per split, changed sources
    and curation settings."""
    from tuneline.curation import diff_versions, load_version
    from tuneline.curation.steps import text_of
    from tuneline.workspace import Workspace

    root = Workspace.at(workspace).datasets_dir
    d = diff_versions(load_version(old, root), load_version(new, root))
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
                console.print(f"    {sign} {ex.where}: {_escape(text_of(ex)[:100])}{_escape(label)}", soft_wrap=True,
                              highlight=False)
            if len(rows) > limit:
                console.print(f"    {sign} ... and {len(rows) - limit:,} more")


@data_app.command("list")
def data_list(workspace: WorkspaceOpt = None) -> None:
    """List the dataset versions in the workspace, oldest first."""
    from tuneline.curation import list_versions
    from tuneline.workspace import Workspace

    versions = list_versions(Workspace.at(workspace).datasets_dir)
    if not versions:
        console.print("no dataset versions yet: `tuneline data prepare SPEC`")
    for m in versions:
        console.print(f"{m['id']}  {m['created']}  {m['spec']}  "
                      + ", ".join(f"{k} {n:,}" for k, n in m["counts"].items()) + f"  rejected {m['rejected']:,}")


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
