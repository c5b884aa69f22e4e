"""The ``tuneline`` command line: the app assembled from one module per command group, and main().

Each module in :data:`COMMAND_MODULES` has ``register(app)``, which adds its commands (``run``)
or its group (``data``, with its subcommands) to the app; a new command group is a new module
with ``register`` and one entry in that tuple (docs/cli.md). Shared argument types are in
:mod:`tuneline.cli.options`, the consoles in :mod:`tuneline.cli.console`, the exit codes in
:mod:`tuneline.cli.exits`. Commands import the pipeline inside their body, so ``--help`` loads
neither torch, transformers nor mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from tuneline import __version__
from tuneline.cli import (
    audit,
    compare,
    data,
    doctor,
    evaluation,
    export,
    golden,
    loop,
    monitor,
    registry,
    report,
    run,
    serve,
    spec,
    workspace,
)
from tuneline.cli.console import err_console, escape
from tuneline.cli.exits import EXIT_ERROR, EXIT_INTERRUPTED
from tuneline.errors import TunelineError
from tuneline.runtime.extras import missing_extra

if TYPE_CHECKING:
    from typer._click import Context as ClickContext  # the Click typer vendors

COMMAND_MODULES = (run, compare, spec, workspace, data, evaluation, golden, report, registry, serve, export, monitor,
                   loop, audit, doctor)

RESUME_HINTS = {
    "run": "the last checkpoint is kept; continue with `tuneline run SPEC --resume`",
    "tune": "finished trials are kept; continue with `tuneline tune SPEC --resume`",
    "compare": "finished combinations are kept; run the same `tuneline compare` again to continue",
}


class Interrupted(Exception):
    """Ctrl-C in a command, carried past Click (which would print "Aborted!" and exit 1) to
    :func:`main`, which prints the command's resume hint and exits 130."""

    def __init__(self, command: str | None) -> None:
        super().__init__(command)
        self.command = command

    @property
    def message(self) -> str:
        hint = RESUME_HINTS.get(self.command or "")
        return f"[yellow]interrupted[/]: {hint}" if hint else "[yellow]interrupted[/]"


class _TunelineGroup(TyperGroup):
    def invoke(self, ctx: ClickContext) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Interrupted(ctx.invoked_subcommand) from exc


app = typer.Typer(
    name="tuneline",
    cls=_TunelineGroup,
    help="Fine-tune language models from one spec: data -> LoRA training -> evaluation -> tracking.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tuneline {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print tuneline's version and exit.")] = False,
) -> None:
    """Fine-tune language models from one spec: data -> LoRA training -> evaluation -> tracking."""


for _module in COMMAND_MODULES:
    _module.register(app)


def main(args: list[str] | None = None) -> None:
    """Entry point: a tuneline error becomes a clear message and exit 1, Ctrl-C the resume hint and
    exit 130; usage errors are Click's (exit 2)."""
    try:
        try:
            app(args=args, prog_name="tuneline")
        except ModuleNotFoundError as missing:  # an optional extra the command needs: say which to install
            if (error := missing_extra(missing)) is None:
                raise
            raise error from None
    except TunelineError as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False)
        raise SystemExit(EXIT_ERROR) from None
    except Interrupted as exc:
        err_console.print(exc.message)
        raise SystemExit(EXIT_INTERRUPTED) from None
