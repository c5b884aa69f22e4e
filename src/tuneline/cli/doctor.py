"""``tuneline doctor [SPEC]``: the machine, and what a spec's training will use and need on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tuneline.cli.console import console, print_json, setup_logging
from tuneline.cli.options import JsonOpt, WorkspaceOpt
from tuneline.spec import load_spec
from tuneline.workspace import Workspace


def register(app: typer.Typer) -> None:
    app.command()(doctor)


def doctor(
    spec: Annotated[Path | None, typer.Argument(help="A tuneline.yaml spec (default: the machine only).",
                                                show_default=False)] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What this machine offers (processor and native bf16, cores, GPU and its memory, PyTorch) and,
    for SPEC, what its training will use: device, precision and why, attention kernel, and the memory
    of one training step (parameters exact, from the model built without its weights; activations and
    logits estimated from batch_size and seq_len)."""
    from tuneline.train.doctor import diagnose  # lazy: reads the model's config with transformers

    setup_logging(False)
    found = diagnose(load_spec(spec) if spec is not None else None, Workspace.at(workspace).models_dir)
    if as_json:
        print_json(found.to_dict())
        return
    m = found.machine
    console.print(f"[bold]machine[/]: {m.cpu}, {m.cores} cores, native bf16: {'yes' if m.cpu_fast_bf16 else 'no'}; "
                  f"torch {m.torch}; " + (f"GPU {m.gpu} ({m.gpu_memory_mib:,} MiB, bf16: {'yes' if m.gpu_bf16 else 'no'})"
                                          if m.gpu else "no CUDA GPU"), soft_wrap=True, highlight=False)
    if found.memory is None:
        return
    console.print(f"[bold]{spec}[/]: {found.method} on {found.device}, precision {found.precision} "
                  f"({found.precision_why}); base weights {found.base_dtype}; attention {found.attention}",
                  soft_wrap=True, highlight=False)
    mem = found.memory
    table = Table(title=f"one training step: {mem.trainable_params:,} of {mem.total_params:,} parameters trained")
    table.add_column("memory")
    table.add_column("MiB", justify="right")
    for label, value in (("weights", mem.weights_bytes), ("gradients", mem.gradients_bytes),
                         ("AdamW state", mem.optimizer_bytes), ("activations (estimate)", mem.activations_bytes),
                         ("logits (estimate)", mem.logits_bytes), ("total", mem.total_bytes)):
        table.add_row(label, f"{value / (1 << 20):,.0f}")
    console.print(table)
    for note in found.notes:
        console.print(f"- {note}", soft_wrap=True, highlight=False)
