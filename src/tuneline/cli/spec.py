"""Spec commands: ``validate`` (a spec and every row of its data) and ``schema``."""

from __future__ import annotations

import typer

from tuneline.cli.console import console, print_json
from tuneline.cli.options import SpecArg
from tuneline.spec import json_schema


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)


def validate(spec: SpecArg) -> None:
    """Check a spec and every row of its data; report all problems at once. Trains nothing."""
    from tuneline import pipeline  # lazy: it pulls numpy and every stage; --help stays fast

    loaded, data = pipeline.validate(spec)
    parts = ", ".join(f"{s.split}: {s.rows_used} rows ({s.path})" for s in data.sources)
    labels = f"; {len(data.labels)} labels" if data.labels else ""
    console.print(f"[green]ok[/] {loaded.path.name}: {loaded.spec.name} ({loaded.spec.task.type}); {parts}{labels}")


def schema() -> None:
    """Print the JSON Schema of tuneline.yaml (for editor completion and validation)."""
    print_json(json_schema())
