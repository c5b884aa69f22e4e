"""``tuneline eval``: evaluate a trained model (``tuneline eval SPEC`` is ``tuneline eval run SPEC``),
and the blind human A/B round trip (``export-human``, ``import-human``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from tuneline.cli.console import console, human_output, print_json, setup_logging
from tuneline.cli.exits import EXIT_GATES_FAILED
from tuneline.cli.options import NoProgressOpt, SpecArg, VerboseOpt, WorkspaceOpt
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from typer._click import Context as ClickContext  # the Click typer vendors


class DefaultToRun(TyperGroup):
    """A command group whose first argument, when it is not a subcommand, goes to ``run``:
    ``tuneline eval SPEC`` is ``tuneline eval run SPEC``."""

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


group = typer.Typer(
    cls=DefaultToRun, no_args_is_help=True,
    help="Evaluate a trained model beside the base and production models: `tuneline eval SPEC` "
         "(= `tuneline eval run SPEC`); blind human A/B rating with export-human / import-human.")


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="eval")


@group.command("run")
def eval_run(
    spec: SpecArg,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder to evaluate (default: the spec's last run).")] = None,
    production: Annotated[Path | None, typer.Option(
        help="Adapter folder of the production model to compare with (default: eval.production).")] = None,
    workspace: WorkspaceOpt = None,
    no_progress: NoProgressOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report (without per-row data) as JSON on "
                                                         "stdout, and nothing else there.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Score base, candidate and production on the test split and golden sets: metrics with 95%
    intervals, paired tests, flips, forgetting, robustness, latency; then check the gates.

    Exits 0 when every gate passes, 3 when one fails (each failure is printed with its margin), 1 on an error.
    """
    setup_logging(verbose)
    from tuneline import pipeline  # lazy: it pulls numpy and every stage; --help stays fast

    with human_output(as_json) as out:
        suite = pipeline.evaluate(spec, workspace=workspace, adapter=adapter, production=production,
                         show_progress=not no_progress, console=out)
    if as_json:
        print_json(suite.to_dict(with_rows=False))
    if not suite.passed:
        raise typer.Exit(EXIT_GATES_FAILED)


@group.command("export-human")
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
    from tuneline.eval import human  # lazy: tuneline.eval pulls numpy; --help stays fast

    done = human.export_last_evaluation(load_spec(spec), Workspace.at(workspace), out=out, against=against,
                                  eval_set=eval_set, n=n, seed=seed)
    console.print(f"{done.written} items written to {out} (fill the `preference` column with A, B or tie); "
                  f"{done.skipped_identical} rows left out because both answers were identical; key kept at {done.key}",
                  soft_wrap=True)


@group.command("import-human")
def eval_import_human(
    spec: SpecArg,
    ratings: Annotated[Path, typer.Argument(help="The rated CSV.", show_default=False)],
    key: Annotated[Path | None, typer.Option(help="Key file (default: the run folder's key for this CSV's name).")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Read raters' preferences back: the candidate's win rate (ties count half) with a 95% interval,
    stored in the evaluation report, checked against a `human_win_rate` gate, and logged to the run."""
    from tuneline.eval import human  # lazy: tuneline.eval pulls numpy; --help stays fast

    done = human.import_ratings(load_spec(spec), Workspace.at(workspace), ratings, key)
    r = done.result
    console.print(f"candidate vs {r['against']}: win rate {r['win_rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                  f"over {r['n']} rated items ({r['wins']} wins, {r['ties']} ties, {r['losses']} losses; "
                  f"{r['unrated']} unrated)")
    if done.logged_to:
        console.print(f"logged to run {done.logged_to}")
