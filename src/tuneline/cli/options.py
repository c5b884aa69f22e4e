"""Argument and option types shared by the command modules: each is defined here once.

A command writes ``workspace: WorkspaceOpt = None``; Typer reads the name, flags and help from
the annotation. Types used by one command only stay in that command's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SpecArg = Annotated[Path, typer.Argument(help="Path to a tuneline.yaml spec.", show_default=False)]
WorkspaceOpt = Annotated[
    Path | None,
    typer.Option("--workspace", "-w", help="Workspace folder (default: $TUNELINE_HOME or ./.tuneline)."),
]
UriOpt = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $TUNELINE_TRACKING_URI, else the workspace's SQLite store).")]

DatasetVersionArg = Annotated[
    str, typer.Argument(help="Dataset version id (or a unique prefix of it); see `tuneline data list`.",
                        metavar="DATASET_VERSION", show_default=False)]
ModelNameArg = Annotated[str, typer.Argument(help="The model: the use case's spec name.", metavar="NAME",
                                             show_default=False)]
ModelVersionArg = Annotated[int, typer.Argument(help="Registered model version number (see `tuneline models`).",
                                                metavar="VERSION", show_default=False)]

NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bars (log lines instead).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (and nothing else there).")]

__all__ = ["DatasetVersionArg", "JsonOpt", "ModelNameArg", "ModelVersionArg", "NoProgressOpt", "SpecArg", "UriOpt",
           "VerboseOpt", "WorkspaceOpt"]
