"""``tuneline report RUN``: write a tracked run's evaluation as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneline.cli.options import UriOpt, WorkspaceOpt


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""

    @app.command("report")
    def report(
        run: Annotated[str, typer.Argument(help="MLflow run id, or a unique prefix of it (6+ characters).",
                                           metavar="RUN", show_default=False)],
        workspace: WorkspaceOpt = None,
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="HTML file to write (default: <workspace>/reports/<run id>.html).")] = None,
        uri: UriOpt = None,
    ) -> None:
        """Write one self-contained HTML page for an evaluated run: gates, metrics with intervals,
        comparisons, plots, flips, forgetting, robustness, latency, loss curves, data and spec.

        Prints the path of the file written. Needs the run's evaluation (`tuneline eval SPEC`).
        """
        from tuneline.report import (
            write_report,  # lazy: the report pulls numpy and every section; --help stays fast
        )

        path = write_report(run, workspace, out, uri=uri)
        typer.echo(str(path))
