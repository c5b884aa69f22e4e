"""``tuneline export``: a registered version as a PEFT adapter, a merged model, GGUF or an MLflow
model; ``--check vllm`` says what vLLM's LoRA loader would refuse, writing nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from tuneline.cli.console import console, err_console, escape, print_json
from tuneline.cli.exits import EXIT_GATES_FAILED
from tuneline.cli.options import JsonOpt, WorkspaceOpt
from tuneline.errors import Problem, TunelineError

FORMATS = ("peft", "merged", "gguf", "mlflow")  # tuneline.export.FORMATS (not imported: it pulls the package at --help)
CHOICES = {"--format": FORMATS, "--gguf-kind": ("merged", "lora"), "--gguf-dtype": ("f16", "f32"),
           "--dtype": ("fp32", "bf16"), "--check": ("vllm",)}


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def _choice(flag: str, value: str | None) -> None:
    if value is not None and value not in CHOICES[flag]:
        raise TunelineError(Problem(f"{flag} {value!r} is not one of {', '.join(CHOICES[flag])}", field=flag))


def export(
    ref: Annotated[str, typer.Argument(help="NAME (its production version), NAME@ALIAS or NAME@VERSION.",
                                       metavar="NAME[@ALIAS|@VERSION]", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="peft | merged | gguf | mlflow.")] = "peft",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write (default: ./NAME-vVERSION-FORMAT, "
                                                               "a GGUF ./NAME-vVERSION[-lora].gguf; mlflow: only "
                                                               "registered unless given). Never overwritten.")] = None,
    gguf_kind: Annotated[str, typer.Option(help="gguf: merged (the whole model) or lora (an adapter over the base's "
                                                "GGUF; LoRA and rsLoRA only).")] = "merged",
    gguf_dtype: Annotated[str | None, typer.Option(help="gguf: f16 or f32 (default: f16 merged, f32 lora).")] = None,
    dtype: Annotated[str, typer.Option(help="merged: weights in fp32 or bf16.")] = "fp32",
    base: Annotated[str | None, typer.Option(help="The base model, when not where the version's spec named it "
                                                  "(checked against the recorded fingerprint).")] = None,
    registered_name: Annotated[str | None, typer.Option(help="mlflow: the registered model to add a version to "
                                                             "(default NAME-mlflow).")] = None,
    check: Annotated[str | None, typer.Option(help="vllm: only say what vLLM's LoRA loader would refuse (exit 3 "
                                                   "if it refuses); nothing is written.")] = None,
    max_lora_rank: Annotated[int, typer.Option(min=1, help="vLLM check: the server's --max-lora-rank.")] = 16,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a registered version: a portable PEFT adapter (printed with vLLM's verdict), the adapter
    merged into its base (safetensors, no peft needed), GGUF for llama.cpp (merged, or a LoRA adapter
    over the base's GGUF), or a self-contained MLflow chat model registered as NAME-mlflow (every
    generative version is also models:/NAME@ALIAS itself, loaded through tuneline). The adapter is
    downloaded from the registry and verified against the hash recorded when it was registered."""
    import tuneline.export as exporting  # lazy: the exporters load a model, not wanted at --help time

    for flag, value in (("--format", fmt), ("--gguf-kind", gguf_kind), ("--gguf-dtype", gguf_dtype),
                        ("--dtype", dtype), ("--check", check)):
        _choice(flag, value)
    if check is not None:
        _check(workspace, ref, max_lora_rank, as_json)
        return
    options = exporting.ExportOptions(
        base=base, dtype=cast("exporting.SaveDtype", dtype), gguf_kind=cast("exporting.GgufKind", gguf_kind),
        gguf_dtype=cast("exporting.GgufDtype | None", gguf_dtype), registered_name=registered_name,
        max_lora_rank=max_lora_rank)
    result = exporting.export(workspace, ref, fmt, out, options)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"exported {result.ref} ({result.method}) as {fmt}"
                  + (f": {escape(str(result.path))}" if result.path else ""), soft_wrap=True)
    if result.registered:
        console.print(f"registered as {result.registered.name} version {result.registered.version} "
                      f"({result.registered.uri})", soft_wrap=True)
    for note in result.notes:
        console.print(f"  {escape(note)}", soft_wrap=True)
    if result.vllm is not None:
        for line in exporting.render_vllm(result.vllm, max_lora_rank):
            console.print(f"  {escape(line)}", soft_wrap=True)


def _check(workspace: Path | None, ref: str, max_lora_rank: int, as_json: bool) -> None:
    import tuneline.export as exporting  # lazy: as above

    exported, findings = exporting.check(workspace, ref, max_lora_rank)
    refused = [f for f in findings if f.refused]
    if as_json:
        print_json({"model": exported, "max_lora_rank": max_lora_rank, "loads": not refused,
                    "findings": [{"what": f.what, "fix": f.fix, "refused": f.refused} for f in findings]})
    else:
        console.print(f"{exported}:")
        for line in exporting.render_vllm(findings, max_lora_rank):
            console.print(f"  {escape(line)}", soft_wrap=True)
    if refused:
        err_console.print(f"vLLM would refuse {exported}: {len(refused)} finding(s)")
        raise typer.Exit(EXIT_GATES_FAILED)
