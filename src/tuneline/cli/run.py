"""The pipeline commands: ``run``, ``tune``, ``baseline``. Each parses its arguments, calls the
Python API (:mod:`tuneline.pipeline`) and prints; ``--json`` prints the result alone on stdout."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Annotated

import typer

from tuneline.cli.console import err_console, human_output, print_json, setup_logging
from tuneline.cli.exits import EXIT_ERROR, EXIT_GATES_FAILED, EXIT_INTERRUPTED
from tuneline.cli.options import JsonOpt, NoProgressOpt, SpecArg, VerboseOpt, WorkspaceOpt

if TYPE_CHECKING:
    from tuneline.pipeline import RunResult
    from tuneline.train.distributed import World


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(tune)
    app.command()(baseline)


def run(
    spec: SpecArg,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of this spec's run.")] = False,
    workspace: WorkspaceOpt = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help=(
        "Train data-parallel on N processes of this machine (torch.distributed: gloo on CPU, NCCL with "
        "one GPU each). Rank 0 runs the pipeline; the others train their share of every step. Under "
        "torchrun or accelerate launch, leave it out."))] = 1,
    dataset: Annotated[str | None, typer.Option("--dataset", metavar="ID", help=(
        "Train on this stored dataset version instead of curating the spec's files: one of this workspace "
        "(`tuneline data list`), or, given whole, one a run of the tracking store logged (fetched once and "
        "checked against its id). Reproduces a run here or on another machine."))] = None,
) -> None:
    """Run the pipeline: validate data, (search,) evaluate the base model, train, evaluate, track.

    With a `search` section the hyperparameter search runs first (or a finished one is reused)
    and the best configuration is trained. Exits 0 when the objective's gates pass, 3 when one
    fails, 1 on an error, 130 when interrupted (resume with --resume, on any number of processes).
    """
    setup_logging(verbose)
    from tuneline.train import distributed  # lazy: torch.distributed only for a distributed run

    if nproc > 1 and distributed.launched_world_size() == 1:
        argv = ["run", str(spec), *(["--resume"] if resume else []), *(["-w", str(workspace)] if workspace else []),
                *(["--no-progress"] if no_progress else []), *(["--json"] if as_json else []),
                *(["-v"] if verbose else []), *(["--dataset", dataset] if dataset else [])]
        raise typer.Exit(distributed.launch_local(nproc, argv, verbose))
    world = distributed.join_world()
    if world is not None and not world.is_main:
        _train_alongside(world, verbose)
        return
    from tuneline import pipeline  # lazy: it pulls numpy and every stage; --help stays fast

    try:
        with human_output(as_json) as out:
            result = pipeline.run(spec, workspace=workspace, resume=resume, show_progress=not no_progress,
                                  console=out, dataset=dataset)
    except KeyboardInterrupt:
        if world is not None and os.environ.get(distributed.LAUNCHED_BY_NPROC):
            raise typer.Exit(EXIT_INTERRUPTED) from None  # `--nproc` itself says what to do, once
        raise
    if world is not None:  # only after a whole run: on an error the launcher stops the other ranks
        from tuneline.train.ranks import release  # lazy: with the distributed run only

        release(world)
        distributed.leave_world()
    if as_json:
        print_json(run_result_dict(result))
    if result.report is not None and not result.report.passed:
        raise typer.Exit(EXIT_GATES_FAILED)


def _train_alongside(world: World, verbose: bool) -> None:
    """A rank other than 0: train the jobs rank 0 sends, quietly (rank 0 reports the run)."""
    from tuneline.train import distributed  # lazy: torch.distributed only for a distributed run
    from tuneline.train.ranks import serve_jobs  # lazy: with the distributed run only

    if not verbose:
        logging.getLogger("tuneline").setLevel(logging.WARNING)
    try:
        serve_jobs(world)
    except KeyboardInterrupt:  # the launcher passes Ctrl-C on to every rank; rank 0 says what to do
        raise typer.Exit(EXIT_INTERRUPTED) from None
    distributed.leave_world()


def run_result_dict(result: RunResult) -> dict[str, object]:
    """``tuneline run --json``: the run, its training, its evaluation (without per-row data)."""
    return {
        "run_id": result.run_id,
        "run_dir": str(result.run_dir),
        "train": result.train.to_dict(),
        "report": result.report.to_dict(with_rows=False) if result.report is not None else None,
        "seconds": result.seconds,
        "model_version": result.model_version,
        "passed": result.passed,
    }


def tune(
    spec: SpecArg,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted search: finished trials are "
                                                          "kept, interrupted ones run again.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Delete this spec's study and search again.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Trials in parallel in this many "
                                                "processes (default: search.workers).")] = None,
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="Override search.trials.")] = None,
    workspace: WorkspaceOpt = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Search hyperparameters (the spec's `search` section): Optuna TPE with pruning, resumable.

    Each trial trains on the training split and is scored on the validation split; each is an
    MLflow child run of the search run. `tuneline run SPEC` afterwards trains and evaluates the
    best configuration (a finished search is reused, not repeated). Exits 1 when no trial completed.
    """
    setup_logging(verbose)
    if resume and restart:
        raise typer.BadParameter("--resume and --restart exclude each other")
    from tuneline import pipeline  # lazy: it pulls numpy and every stage; --help stays fast

    with human_output(as_json) as out:
        found = pipeline.tune(spec, workspace=workspace, resume=resume, restart=restart, workers=workers,
                              trials=trials, show_progress=not no_progress, console=out)
    if as_json:
        print_json(found.to_dict())
    if found.best is None:
        err_console.print("[red]no trial completed[/]: nothing to train; see the trials above")
        raise typer.Exit(EXIT_ERROR)
    if not as_json:
        out.print(f"next: `tuneline run {spec}` trains and evaluates the best configuration")


def baseline(
    spec: SpecArg,
    workspace: WorkspaceOpt = None,
    all_rows: Annotated[bool, typer.Option("--all-rows", help=(
        "Measure every test item, also when the spec's baseline.max_rows samples them."))] = False,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Should we fine-tune at all? Measure prompt-only, few-shot, retrieval and an embedding classifier.

    Each option answers the test rows (a seeded sample of them with baseline.max_rows, unless
    --all-rows), scored with the evaluation's metrics and 95% intervals, with its one-off cost,
    latency and prompt length, beside the spec's last fine-tuned run when it was evaluated on the
    same rows; then the cheapest option not significantly worse than the best.
    """
    setup_logging(verbose)
    from tuneline import pipeline  # lazy: it pulls numpy and every stage; --help stays fast

    with human_output(as_json) as out:
        report = pipeline.baseline(spec, workspace=workspace, show_progress=not no_progress, console=out,
                                   all_rows=all_rows)
    if as_json:
        print_json(report.to_dict(with_rows=False))
