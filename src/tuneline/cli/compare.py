"""``tuneline compare``: base models x methods, measured on the same rows, and a recommendation."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneline.cli.console import human_output, print_json, setup_logging
from tuneline.cli.options import JsonOpt, NoProgressOpt, SpecArg, VerboseOpt, WorkspaceOpt


def register(app: typer.Typer) -> None:
    app.command()(compare)


def compare(
    spec: SpecArg,
    models: Annotated[str | None, typer.Option(
        "--models", help="Base models to compare, comma-separated: built-in aliases, hub ids, model folders "
                         "(default: the spec's model).")] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Training methods, comma-separated: lora, dora, rslora, ia3, prefix, prompt, full "
                          "(default: the spec's train.method).")] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="PATH=VALUE: a spec value for every combination (--set train.max_steps=200); "
                      "METHOD:PATH=VALUE for one method (--set ia3:train.lr=5e-3). Repeatable.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Combinations in parallel, each in a worker "
                                                                  "process of its own.")] = 1,
    ray: Annotated[bool, typer.Option("--ray", help="Run the combinations as Ray tasks (the spec's search.ray "
                                                    "settings: address, cpus/gpus per task).")] = False,
    rows: Annotated[int | None, typer.Option("--rows", min=1, help="Score on a seeded sample of this many test "
                                                                   "items, the same for every combination "
                                                                   "(default: all).")] = None,
    workspace: WorkspaceOpt = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Which base model and method? Train each combination and measure it on the same test rows.

    Each combination is the spec with its model and train.method replaced (a method other than the
    spec's gets a learning rate scaled for it unless --set gives one). The table: quality with 95%
    intervals, a paired test against the best, training time and tokens/s, peak memory, adapter size,
    p50/p95 latency of single requests, parameters, licence; then the cheapest option not significantly
    worse than the best. Finished combinations are reused when the same comparison runs again.
    """
    setup_logging(verbose)
    if ray and workers > 1:
        raise typer.BadParameter("--ray and --workers exclude each other (Ray places the tasks itself)")
    import tuneline.compare as comparing  # lazy: it pulls numpy and training; --help stays fast
    from tuneline.compare.plan import split_list  # lazy: with the package above

    options = comparing.CompareOptions(split_list(models), split_list(methods), list(sets or []), workers, ray, rows)
    with human_output(as_json) as out:
        report = comparing.compare(spec, options, workspace=workspace, console=out, show_progress=not no_progress)
        if not as_json:
            out.print(comparing.compare_table(report))
            if report.mlflow_run_id:
                out.print(f"recorded in run {report.mlflow_run_id}; HTML page: "
                          f"`tuneline report {report.mlflow_run_id[:12]}`", highlight=False)
    if as_json:
        print_json(report.to_dict(with_rows=False))
