"""Registry commands: ``models``, ``promote``, ``rollback``, ``lineage``, ``card``."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tuneline.audit import trail_of
from tuneline.cli.console import console, err_console, print_json
from tuneline.cli.options import JsonOpt, ModelNameArg, ModelVersionArg, UriOpt, WorkspaceOpt
from tuneline.registry import get_version, list_versions
from tuneline.registry import lineage as get_lineage
from tuneline.registry import promote as do_promote
from tuneline.registry import rollback as do_rollback
from tuneline.workspace import Workspace


def _uri(workspace: Path | None, uri: str | None) -> str:
    return uri or Workspace.at(workspace).tracking_uri


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("lineage")(lineage)
    app.command("card")(card)


def models(
    name: Annotated[str | None, typer.Argument(help="Only this model.", show_default=False)] = None,
    workspace: WorkspaceOpt = None, uri: UriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered model versions with their aliases, metrics and gate status, newest first;
    the erasures whose rows a version still carries (retrain it: `tuneline retrain NAME`)."""
    versions = list_versions(_uri(workspace, uri), name)
    if as_json:
        rows = [{**asdict(v), "gate_state": v.gate_state, "reevaluations": v.reevaluations,
                 "erasures": v.erasures, "carries_erased_data": bool(v.erasures)} for v in versions]
        print_json(rows)
        return
    if not versions:
        console.print("no registered models yet: `tuneline run SPEC` registers each trained adapter")
        return
    table = Table(title="registered models")
    for col in ("model", "version", "aliases", "created", "dataset", "metrics", "gates", "erased data"):
        table.add_column(col)
    for v in versions:
        gates = {"passed": "[green]passed[/]", "failed": f"[red]failed[/] {v.gates_failed}",
                 "not gated": "[yellow]not gated[/]"}.get(v.gate_state, v.gate_state)
        gates += "".join(f"\n[dim]re-evaluated under spec {r['spec_sha256'][:12]}: {r['gate_state']} "
                         "(not counted)[/]" for r in v.reevaluations)
        shown = {k: x for k, x in v.metrics.items() if k in ("accuracy", "macro_f1", "rouge_l", "json_valid")}
        table.add_row(v.name, str(v.version), ", ".join(v.aliases) or "-", v.created,
                      v.tags.get("tuneline.dataset_version", "-"),
                      ", ".join(f"{k} {x:.3f}" for k, x in shown.items()) or "-", gates,
                      "[red]still carries[/] " + ", ".join(v.erasures) if v.erasures else "-")
    console.print(table)


def promote(
    name: ModelNameArg, version: ModelVersionArg,
    force: Annotated[bool, typer.Option(
        "--force", help="Promote although the gates failed, were not evaluated or the spec has none (needs --reason).")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the alias history.")] = None,
    workspace: WorkspaceOpt = None, uri: UriOpt = None,
) -> None:
    """Move the `production` alias to VERSION, only if its gates passed under the spec it was trained
    with (or with --force --reason)."""
    trail = trail_of(Workspace.at(workspace))
    try:
        info = do_promote(_uri(workspace, uri), name, version, force=force, reason=reason, trail=trail)
    finally:
        trail.close()
    forced = f" [yellow](forced: gates {info.describe_gates()})[/]" if force and info.gate_state != "passed" else ""
    console.print(f"[green]promoted[/] {name} version {version} to production{forced}")


def rollback(
    name: ModelNameArg,
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the alias history.")] = None,
    workspace: WorkspaceOpt = None, uri: UriOpt = None,
) -> None:
    """Move `production` back to the version that held it before the current one."""
    trail = trail_of(Workspace.at(workspace))
    try:
        current, previous = do_rollback(_uri(workspace, uri), name, reason, trail=trail)
    finally:
        trail.close()
    console.print(f"[green]rolled back[/] {name}: production {current} -> {previous}")


def lineage(
    name: ModelNameArg, version: ModelVersionArg, workspace: WorkspaceOpt = None, uri: UriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the chain behind a version: source files -> dataset version -> curation -> training run
    -> evaluation -> the aliases it held and when."""
    chain = get_lineage(_uri(workspace, uri), Workspace.at(workspace).datasets_dir, name, version)
    if as_json:
        print_json(chain)
        return
    p = console.print
    p(f"[bold]{name} version {version}[/] (aliases: {', '.join(chain['aliases']) or 'none'}); adapter {chain['source']}",
      soft_wrap=True)
    p("source files")
    for s in chain["sources"]:
        p(f"  {s['split']}: {s['path']} sha256 {s['sha256'][:16]} ({s['rows_used']} rows used)", soft_wrap=True)
    if (fb := chain.get("feedback")) is not None:
        p(f"  feedback: {fb['rows']} training rows from the feedback on requests {', '.join(fb['request_ids'])} "
          f"(harvests {', '.join(fb['harvests']) or '-'}; {fb['links']})", soft_wrap=True)
    ds = chain["dataset"]
    p(f"-> dataset version {ds['id'] or '(curation off)'}: {ds['counts'] or ''}", soft_wrap=True)
    if ds["id"]:
        p(f"-> curation: {' -> '.join(ds['steps'])}; dropped {ds['dropped'] or 'none'}; manifest {ds['manifest']}",
          soft_wrap=True)
    run = chain["run"]
    p(f"-> training run {run['id']}: {run['params']}", soft_wrap=True)
    p(f"   code {run['code']}, spec sha256 {str(run['spec_sha256'])[:16]}, base model {run['base_model']} "
      f"({str(run['base_model_fingerprint'])[:16]}), torch {run['libraries'].get('torch', '?')}, "
      f"transformers {run['libraries'].get('transformers', '?')}, peft {run['libraries'].get('peft', '?')}",
      soft_wrap=True)
    ev = chain["eval"]
    gates = f"FAILED ({ev['gates_failed']})" if ev["gate_state"] == "failed" else ev["gate_state"]
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in ev["metrics"].items()
                        if k in ("accuracy", "macro_f1", "rouge_l", "json_valid"))
    p(f"-> evaluation: gates {gates} under spec sha256 {str(ev['spec_sha256'])[:16]}; {metrics}; "
      f"report {ev['report']}", soft_wrap=True)
    for r in ev["reevaluations"]:
        failed = f" ({r['gates_failed']})" if r["gates_failed"] else ""
        p(f"   re-evaluated {r['at']} under another spec (sha256 {r['spec_sha256'][:16]}): gates {r['gate_state']}"
          f"{failed}; not counted for promotion", soft_wrap=True)
    p("-> aliases held")
    for h in chain["aliases_held"]:
        forced = f" (forced; gates {h['gates']})" if h["forced"] and h.get("gates") else " (forced)" if h["forced"] else ""
        until = h["until"] or "now"
        p(f"  {h['alias']}: {h['from']} -> {until} ({h['how']}{forced} by {h['by']}: {h['reason']})", soft_wrap=True)


def card(
    name: ModelNameArg, version: ModelVersionArg,
    out: Annotated[Path | None, typer.Option("--out", help="Write the card to FILE instead of printing it.",
                                             metavar="FILE")] = None,
    workspace: WorkspaceOpt = None, uri: UriOpt = None,
) -> None:
    """Print the model card of VERSION: the Hugging Face README.md stored with its adapter. For a
    version registered before cards existed, the card is generated now from what the registry and
    its run hold (and says so)."""
    import tuneline.registry.card as cards  # lazy: huggingface_hub, the eval results

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the card alone on stdout
    ws = Workspace.at(workspace)
    tracking_uri = uri or ws.tracking_uri
    info = get_version(tracking_uri, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        text = cards.stored_card(info, Path(tmp))
    if text is None:
        facts = cards.gather(tracking_uri, ws, name, version)
        facts.generated_note = (f"Generated on {cards.now()} by `tuneline card`: version {version} was registered "
                                "before tuneline wrote model cards, so none is stored with it.")
        text = cards.render(facts)
        err_console.print(f"[yellow]{name} version {version} has no stored model card (registered before cards "
                          "existed): generated it now from the registry and its run[/]")
    elif cards.card_sha256(text) != info.tags.get(cards.CARD_SHA_TAG):
        err_console.print(f"[yellow]the stored card of {name} version {version} is not the one written when it was "
                          "registered (its SHA-256 differs from the version's tag)[/]")
    if out is not None:
        out.write_text(text, encoding="utf-8")
        err_console.print(f"wrote {out}")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
