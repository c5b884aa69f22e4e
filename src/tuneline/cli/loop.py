"""The closed loop's commands: ``feedback harvest`` (corrections become a dataset version) and
``retrain`` (the production model retrained on them, behind the gates)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneline.audit import audited
from tuneline.cli.console import console, human_output, print_json, setup_logging
from tuneline.cli.exits import EXIT_GATES_FAILED
from tuneline.cli.options import JsonOpt, ModelNameArg, NoProgressOpt, VerboseOpt, WorkspaceOpt
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from rich.console import Console

    from tuneline.monitor.harvest import HarvestResult

feedback_group = typer.Typer(help="Turn feedback on logged answers into training data.", no_args_is_help=True)

SpecOpt = Annotated[Path | None, typer.Option(
    "--spec", help="The model's spec (default: the tuneline.yaml shipped with its production version).")]
RequestsOpt = Annotated[str | None, typer.Option(
    "--requests", help="SQLAlchemy URL of the request log (default: $TUNELINE_DATABASE_URL, else the workspace's requests.db).")]


def register(app: typer.Typer) -> None:
    app.add_typer(feedback_group, name="feedback")
    app.command("retrain")(retrain)


@feedback_group.command("harvest")
def feedback_harvest(
    name: ModelNameArg,
    spec: SpecOpt = None,
    workspace: WorkspaceOpt = None,
    requests: RequestsOpt = None,
    everything: Annotated[bool, typer.Option("--all", help="Harvest feedback already harvested into a version "
                                                           "again.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Turn the corrections (and, by the spec's monitor.feedback policy, accepted answers) on NAME's
    logged answers into a new dataset version, through the spec's curation.

    Each row lists the request ids it came from; corrected answers are also kept as preference
    pairs (preferences.jsonl in the version). Feedback already harvested is skipped (unless --all);
    every skipped entry is counted by reason.
    """
    setup_logging(verbose)
    from tuneline.pipeline.retrain import harvest_model  # lazy: it pulls curation and the registry

    with audited(Workspace.at(workspace), "feedback.harvest", subject=f"model:{name}") as entry:
        result = harvest_model(name, workspace, spec=spec, request_log=requests, everything=everything)
        if result.created and result.version:
            entry.outputs["dataset"] = result.version
        entry.details.update(rows=result.rows, requests=len(result.request_ids), feedback_read=result.feedback,
                             skipped=dict(result.skipped))
    if as_json:
        print_json(result.to_dict())
        return
    _print_harvest(result, console)


def _print_harvest(result: HarvestResult, out: Console) -> None:
    if result.created:
        span = f" ({result.requests['first']} .. {result.requests['last']})" if result.requests else ""
        out.print(f"harvested {result.rows} training rows ({result.preference_pairs} preference pairs) from the "
                  f"feedback on {len(result.request_ids)} requests of {result.model}{span} into dataset version "
                  f"{result.version}", soft_wrap=True)
        out.print(f"stored in {result.version_path}; rows as harvested: {result.file}", soft_wrap=True)
    else:
        last = f"; the last harvest is dataset version {result.version}" if result.version else ""
        out.print(f"no new feedback became training rows for {result.model} ({result.feedback} feedback entries read, "
                  f"{result.already_harvested} harvested before){last}", soft_wrap=True)
    if result.skipped:
        out.print("skipped feedback: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())),
                  soft_wrap=True)
    if result.created:
        out.print(f"retrain on it: `tuneline retrain {result.model}`")


def retrain(
    name: ModelNameArg,
    spec: SpecOpt = None,
    workspace: WorkspaceOpt = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Retrain NAME's production version on its dataset plus the harvested feedback, with its recipe.

    The candidate is evaluated against production with the spec's gates and registered; it is
    promoted only when monitor.retrain.auto_promote is on and every gate passed, otherwise it waits
    for `tuneline promote NAME VERSION`. Exits 0 when a candidate was registered (promoted or
    waiting), 3 when its gates failed, 1 on an error (e.g. fewer than monitor.retrain.min_new_rows
    new rows).
    """
    setup_logging(verbose)
    from tuneline.pipeline import retrain as retraining  # lazy: it pulls every stage of a run

    with human_output(as_json) as out, audited(Workspace.at(workspace), "retrain", subject=f"model:{name}") as entry:
        result = retraining.retrain(name, workspace, spec=spec, console=out, show_progress=not no_progress)
        entry.inputs["model"] = f"{name}/{result.production_version}"
        if result.dataset_version:
            entry.outputs["dataset"] = result.dataset_version
        if result.candidate_version is not None:
            entry.outputs["model"] = f"{name}/{result.candidate_version}"
        entry.outputs["run"] = result.run.run_id
        entry.details.update(new_rows=result.new_rows, gates=result.gate_state, promoted=result.promoted)
    if as_json:
        print_json(result.to_dict())
    if result.report is not None and not result.report.passed:
        raise typer.Exit(EXIT_GATES_FAILED)
