"""The ``tuneline`` command line. Each command parses its arguments and calls the Python API.

Heavy libraries (torch, transformers, mlflow) are imported inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from tuneline.errors import TunelineError
from tuneline.runtime.extras import missing_extra

if TYPE_CHECKING:
    from tuneline.eval import EvalSuite

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
    """Run the pipeline: validate data, (search,) evaluate the base model, train, evaluate, track.

    With a `search` section the hyperparameter search runs first (or a finished one is reused)
    and the best configuration is trained. Exits 0 when the objective's thresholds pass, 2 when they fail, 1 on an error.
    """
    _setup_logging(verbose)
    from tuneline.pipeline import run as run_pipeline

    result = run_pipeline(spec, workspace=workspace, resume=resume, show_progress=not no_progress, console=console)
    if result.report is not None and not result.report.passed:
        raise typer.Exit(2)


@app.command()
def tune(
    spec: SpecArg,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted search: finished trials are "
                                                          "kept, interrupted ones run again.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Delete this spec's study and search again.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Trials in parallel in this many "
                                                "processes (default: search.workers).")] = None,
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="Override search.trials.")] = None,
    workspace: WorkspaceOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Search hyperparameters (the spec's `search` section): Optuna TPE with pruning, resumable.

    Each trial trains on the training split and is scored on the validation split; each is an
    MLflow child run of the search run. `tuneline run SPEC` afterwards trains and evaluates the
    best configuration (a finished search is reused, not repeated).
    """
    _setup_logging(verbose)
    if resume and restart:
        raise typer.BadParameter("--resume and --restart exclude each other")
    from tuneline.pipeline import tune as tune_pipeline

    found = tune_pipeline(spec, workspace=workspace, resume=resume, restart=restart, workers=workers, trials=trials,
                          show_progress=not no_progress, console=console)
    if found.best is None:
        raise typer.Exit(2)
    console.print(f"next: `tuneline run {spec}` trains and evaluates the best configuration")


@app.command()
def baseline(
    spec: SpecArg,
    workspace: WorkspaceOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Should we fine-tune at all? Measure prompt-only, few-shot, retrieval and an embedding classifier.

    Each option answers the test rows, scored with the evaluation's metrics and 95% intervals, with
    its one-off cost, latency and prompt length, beside the spec's last fine-tuned run when it was
    evaluated on the same rows; then the cheapest option not significantly worse than the best.
    """
    _setup_logging(verbose)
    from tuneline.pipeline import baseline as baseline_pipeline

    baseline_pipeline(spec, workspace=workspace, show_progress=not no_progress, console=console)


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
    trials: Annotated[bool, typer.Option("--trials", help="Also list search trials (child runs).")] = False,
) -> None:
    """List tracked runs, newest first, with their key metrics (search trials with --trials)."""
    from rich.table import Table

    from tuneline.tracking import list_runs
    from tuneline.workspace import Workspace

    rows = list_runs(Workspace.at(workspace), uri=uri, max_results=limit, include_trials=trials)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
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


class _DefaultCommandGroup(TyperGroup):
    """A command group whose first argument, when it is not a subcommand, goes to ``run``:
    ``tuneline eval SPEC`` is ``tuneline eval run SPEC``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_DefaultCommandGroup, no_args_is_help=True,
    help="Evaluate a trained model beside the base and production models: `tuneline eval SPEC` "
         "(= `tuneline eval run SPEC`); blind human A/B rating with export-human / import-human.")
app.add_typer(eval_app, name="eval")


@eval_app.command("run")
def eval_run(
    spec: SpecArg,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder to evaluate (default: the spec's last run).")] = None,
    production: Annotated[Path | None, typer.Option(
        help="Adapter folder of the production model to compare with (default: eval.production).")] = None,
    workspace: WorkspaceOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the report (without per-row data) as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score base, candidate and production on the test split and golden sets: metrics with 95%
    intervals, paired tests, flips, forgetting, robustness, latency; then check the gates.

    Exits 0 when every gate passes, 2 when one fails (each failure is printed with its margin), 1 on an error.
    """
    _setup_logging(verbose)
    from tuneline.pipeline import evaluate

    suite = evaluate(spec, workspace=workspace, adapter=adapter, production=production,
                     show_progress=not no_progress, console=console)
    if as_json:
        sys.stdout.write(json.dumps(suite.to_dict(with_rows=False), indent=2) + "\n")
    if not suite.passed:
        raise typer.Exit(2)


def _last_report(spec: Path, workspace: Path | None) -> tuple[EvalSuite, Path]:
    from tuneline.errors import Problem, TrainingError
    from tuneline.eval import EvalSuite
    from tuneline.spec import load_spec
    from tuneline.workspace import Workspace

    loaded = load_spec(spec)
    run_dir = Workspace.at(workspace).run_dir(loaded.spec.name)
    path = run_dir / "eval_report.json"
    if not path.is_file():
        raise TrainingError(Problem(f"no evaluation of {loaded.spec.name!r} yet ({path} not found)",
                                    hint=f"run `tuneline run {spec}` or `tuneline eval {spec}` first"))
    return EvalSuite.from_dict(json.loads(path.read_text())), run_dir


@eval_app.command("export-human")
def eval_export_human(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV to hand to raters.")] = Path("human_ab.csv"),
    against: Annotated[str, typer.Option(help="Compare the candidate with: base or production.")] = "base",
    eval_set: Annotated[str, typer.Option("--set", help="Evaluation set: test or a golden set's name.")] = "test",
    n: Annotated[int | None, typer.Option("-n", help="At most this many items (default: all).")] = 100,
    seed: int = 0,
    workspace: WorkspaceOpt = None,
) -> None:
    """Write a blind, shuffled A/B file of the last evaluation's answers (candidate vs base or
    production) for raters; the key that unblinds it is kept in the run folder."""
    from tuneline.errors import Problem, TunelineError
    from tuneline.eval.human import export_human

    suite, run_dir = _last_report(spec, workspace)
    s = next((x for x in suite.sets if x.name == eval_set), None)
    if s is None:
        raise TunelineError(Problem(f"no evaluation set {eval_set!r} in the last evaluation",
                                    hint=f"choose one of {[x.name for x in suite.sets]}"))
    cand, other = s.system("candidate"), s.system(against)
    if cand is None or other is None:
        raise TunelineError(Problem(f"the last evaluation has no {against!r} answers",
                                    hint="use --against base, or evaluate with a production model first"))
    from tuneline.eval.human import reference_cell

    rows = [{"id": w, "input": i, "reference": reference_cell(r), "candidate": a, against: b}
            for w, i, r, a, b in zip(s.wheres, s.inputs, s.all_references(), cand.predictions, other.predictions,
                                     strict=True)]
    key = run_dir / "human" / f"{out.stem}.key.json"
    key.parent.mkdir(parents=True, exist_ok=True)
    written = export_human(rows, candidate="candidate", other=against, out=out, key_out=key, n=n, seed=seed)
    skipped = json.loads(key.read_text()).get("skipped_identical", 0)
    console.print(f"{written} items written to {out} (fill the `preference` column with A, B or tie); "
                  f"{skipped} rows left out because both answers were identical; key kept at {key}", soft_wrap=True)


@eval_app.command("import-human")
def eval_import_human(
    spec: SpecArg,
    ratings: Annotated[Path, typer.Argument(help="The rated CSV.", show_default=False)],
    key: Annotated[Path | None, typer.Option(help="Key file (default: the run folder's key for this CSV's name).")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Read raters' preferences back: the candidate's win rate (ties count half) with a 95% interval,
    stored in the evaluation report, checked against a `human_win_rate` gate, and logged to the run."""
    import mlflow

    from tuneline.eval import check_gates
    from tuneline.eval.human import import_human
    from tuneline.spec import load_spec
    from tuneline.tracking import tracking_uri
    from tuneline.workspace import Workspace

    suite, run_dir = _last_report(spec, workspace)
    key = key or run_dir / "human" / f"{ratings.stem}.key.json"
    result = import_human(ratings, key)
    if not result["n"]:
        err_console.print(f"no rated items in {ratings} ({result['unrated']} unrated): fill the `preference` column "
                          "with A, B or tie")
        raise typer.Exit(1)
    suite.human = result
    loaded = load_spec(spec)
    suite.gates = check_gates(loaded.spec.objective, suite)
    (run_dir / "eval_report.json").write_text(json.dumps(suite.to_dict(), indent=2))
    console.print(f"candidate vs {result['against']}: win rate {result['win_rate']:.3f} "
                  f"[{result['low']:.3f}, {result['high']:.3f}] over {result['n']} rated items "
                  f"({result['wins']} wins, {result['ties']} ties, {result['losses']} losses; {result['unrated']} unrated)")
    state = run_dir / "run.json"
    run_id = json.loads(state.read_text()).get("mlflow_run_id") if state.is_file() else None
    if run_id:
        mlflow.set_tracking_uri(tracking_uri(loaded, Workspace.at(workspace)))
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({"human.win_rate": result["win_rate"], "human.win_rate_low": result["low"],
                                "human.win_rate_high": result["high"], "human.rated": result["n"]})
            mlflow.log_artifact(str(ratings), "human")
            mlflow.log_dict(suite.to_dict(), "eval/report.json")
        console.print(f"logged to run {run_id}")


golden_app = typer.Typer(help="Golden sets: named, frozen evaluation sets with their registered versions.",
                         no_args_is_help=True)
app.add_typer(golden_app, name="golden")


@golden_app.command("list")
def golden_list(spec: SpecArg, workspace: WorkspaceOpt = None) -> None:
    """Each golden set of the spec: registered versions, and whether the file on disk still matches."""
    from tuneline.data import read_golden_examples
    from tuneline.eval.golden import registered_versions
    from tuneline.spec import load_spec
    from tuneline.workspace import Workspace

    loaded = load_spec(spec)
    root = Workspace.at(workspace).root
    if not loaded.spec.eval.golden:
        console.print("the spec declares no golden sets (eval.golden)")
    for g in loaded.spec.eval.golden:
        versions = registered_versions(root, loaded.spec.name, g.name)
        _, sha = read_golden_examples(loaded, g)
        if not versions:
            state = "not registered yet (registered as v1 on first use)"
        elif versions[-1]["sha256"] == sha:
            state = f"[green]v{versions[-1]['version']}[/], file unchanged"
        else:
            state = f"[red]file changed since v{versions[-1]['version']}[/]: `tuneline golden register {spec} {g.name}`"
        console.print(f"{g.name} ({g.path}): {state}", soft_wrap=True)
        for v in versions:
            console.print(f"  v{v['version']}  {v['registered']}  {v['rows']} rows  sha256 {v['sha256'][:16]}")


@golden_app.command("register")
def golden_register(
    spec: SpecArg,
    name: Annotated[str, typer.Argument(help="The golden set's name in eval.golden.", show_default=False)],
    workspace: WorkspaceOpt = None,
) -> None:
    """Register the golden set's current file as its next version (nothing happens if unchanged)."""
    from tuneline.eval import register_golden
    from tuneline.spec import load_spec
    from tuneline.workspace import Workspace

    entry, created = register_golden(load_spec(spec), name, Workspace.at(workspace).root)
    if created:
        console.print(f"[green]registered[/] {name} v{entry['version']} ({entry['rows']} rows, sha256 {entry['sha256'][:16]})")
    else:
        console.print(f"{name} is unchanged: still v{entry['version']}")


def _register_report() -> None:
    from tuneline.cli.registry import register as register_registry
    from tuneline.cli.report import register
    from tuneline.cli.serve import register as register_serve

    register(app)
    register_registry(app)
    register_serve(app)


_register_report()


def _fmt(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else "-"


def main() -> None:
    """Entry point: turn tuneline errors into a clear message and exit code 1."""
    try:
        try:
            app()
        except ModuleNotFoundError as missing:  # an optional extra the command needs: say which to install
            if (error := missing_extra(missing)) is None:
                raise
            raise error from None
    except TunelineError as exc:
        err_console.print(f"[bold red]error:[/] {_escape(exc.render())}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: the last checkpoint is kept; continue with `tuneline run SPEC --resume`")
        sys.exit(130)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
