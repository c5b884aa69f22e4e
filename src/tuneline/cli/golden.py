"""``tuneline golden``: golden sets, named frozen evaluation sets, and their registered versions."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneline.cli.console import console
from tuneline.cli.options import SpecArg, WorkspaceOpt
from tuneline.data import read_golden_examples
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

group = typer.Typer(help="Golden sets: named, frozen evaluation sets with their registered versions.",
                    no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="golden")


@group.command("list")
def golden_list(spec: SpecArg, workspace: WorkspaceOpt = None) -> None:
    """Each golden set of the spec: registered versions, and whether the file on disk still matches."""
    from tuneline.eval import golden  # lazy: tuneline.eval pulls numpy; --help stays fast

    loaded = load_spec(spec)
    root = Workspace.at(workspace).root
    if not loaded.spec.eval.golden:
        console.print("the spec declares no golden sets (eval.golden)")
    for g in loaded.spec.eval.golden:
        versions = golden.registered_versions(root, loaded.spec.name, g.name)
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


@group.command("register")
def golden_register(
    spec: SpecArg,
    name: Annotated[str, typer.Argument(help="The golden set's name in eval.golden.", show_default=False)],
    workspace: WorkspaceOpt = None,
) -> None:
    """Register the golden set's current file as its next version (nothing happens if unchanged)."""
    from tuneline.eval import golden  # lazy: tuneline.eval pulls numpy; --help stays fast

    entry, created = golden.register_golden(load_spec(spec), name, Workspace.at(workspace).root)
    if created:
        console.print(f"[green]registered[/] {name} v{entry['version']} ({entry['rows']} rows, sha256 {entry['sha256'][:16]})")
    else:
        console.print(f"{name} is unchanged: still v{entry['version']}")
