"""Export: a registered version as files other tools load (``tuneline export``).

``peft`` the adapter folder as PEFT loads it (:mod:`.peft_folder`); ``merged`` the adapter merged into
its base as safetensors (:mod:`.merged`); ``gguf`` the merged model or a LoRA adapter as llama.cpp
GGUF (:mod:`.gguf_files`); ``mlflow`` a self-contained MLflow chat model registered as
``NAME-mlflow`` (:mod:`.mlflow_model`; every generative version is an MLflow model of ``NAME``
itself, :mod:`.version_model`). Every export starts from the version's ``adapter`` artifact downloaded
and verified against the tree hash recorded at registration (:mod:`.source`), and writes an
``export.json`` saying what it was made from. :mod:`.vllm` says what vLLM's LoRA loader refuses.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tuneline.artifacts import replace_dir
from tuneline.errors import Problem
from tuneline.export.gguf_files import GgufDtype, write_lora_gguf, write_model_gguf
from tuneline.export.merged import SaveDtype, export_merged, merged_model
from tuneline.export.mlflow_model import Registered, export_mlflow
from tuneline.export.peft_folder import export_peft
from tuneline.export.source import ExportError, Fetched, fetch
from tuneline.export.vllm import VLLM_DEFAULT_MAX_RANK, Finding, check_vllm
from tuneline.export.vllm import render as render_vllm
from tuneline.tracking import quiet_downloads
from tuneline.workspace import Workspace

ExportFormat = Literal["peft", "merged", "gguf", "mlflow"]
FORMATS: tuple[str, ...] = ("peft", "merged", "gguf", "mlflow")
GgufKind = Literal["merged", "lora"]

__all__ = ["FORMATS", "ExportError", "ExportOptions", "Exported", "Finding", "GgufDtype", "GgufKind", "SaveDtype",
           "check", "export", "render_vllm"]


@dataclass(frozen=True)
class ExportOptions:
    base: str | None = None  # the base model (default: the one the version records)
    dtype: SaveDtype = "fp32"  # merged safetensors
    gguf_kind: GgufKind = "merged"
    gguf_dtype: GgufDtype | None = None  # None: f16 for a merged GGUF, f32 for a LoRA GGUF (as llama.cpp's converters)
    registered_name: str | None = None  # mlflow: the registered model (default NAME-mlflow)
    max_lora_rank: int = VLLM_DEFAULT_MAX_RANK  # vLLM check: what the server is started with


@dataclass
class Exported:
    ref: str  # NAME@VERSION exported
    format: str
    path: Path | None  # the folder or file written (mlflow without --out: None)
    method: str
    notes: list[str] = field(default_factory=list)
    vllm: list[Finding] | None = None  # peft exports: what vLLM's LoRA loader refuses
    registered: Registered | None = None  # mlflow

    def to_dict(self) -> dict[str, object]:
        return {"model": self.ref, "format": self.format, "path": str(self.path) if self.path else None,
                "method": self.method, "notes": self.notes,
                "vllm": None if self.vllm is None else [{"what": f.what, "fix": f.fix, "refused": f.refused}
                                                        for f in self.vllm],
                "registered": None if self.registered is None else {
                    "name": self.registered.name, "version": self.registered.version,
                    "aliases": self.registered.aliases, "uri": self.registered.uri}}


def default_out(fetched: Fetched, fmt: str, options: ExportOptions) -> Path:
    """``./NAME-vVERSION-FORMAT`` (a GGUF: ``….gguf``, a LoRA GGUF ``NAME-vVERSION-lora.gguf``)."""
    stem = f"{fetched.info.name}-v{fetched.info.version}"
    if fmt == "gguf":
        return Path(f"{stem}-lora.gguf" if options.gguf_kind == "lora" else f"{stem}.gguf")
    return Path(f"{stem}-{fmt}")


def export(workspace: Workspace | str | Path | None, ref: str, fmt: str, out: Path | None = None,
           options: ExportOptions | None = None) -> Exported:
    """Export the version ``ref`` (NAME, NAME@ALIAS or NAME@VERSION) as ``fmt`` into ``out``."""
    options = options or ExportOptions()
    if fmt not in FORMATS:
        raise ExportError(Problem(f"unknown export format {fmt!r}", field="--format", hint=f"one of {', '.join(FORMATS)}"))
    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    with quiet_downloads(), tempfile.TemporaryDirectory(prefix="tuneline-export-") as tmp:
        fetched = fetch(ws, ref, Path(tmp) / "download")
        if fmt == "mlflow":
            registered, notes = export_mlflow(fetched, ws, _fresh(out) if out else None, base=options.base,
                                              registered_name=options.registered_name)
            return Exported(fetched.ref, fmt, out, fetched.method, notes, registered=registered)
        target = _fresh(out or default_out(fetched, fmt, options))
        staged = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staged, ignore_errors=True)
        staged.unlink(missing_ok=True)
        result = Exported(fetched.ref, fmt, target, fetched.method)
        result.notes = _write(fetched, ws, fmt, staged, options)
        if fmt == "peft":
            result.vllm = check_vllm(staged, options.max_lora_rank)
        _publish(staged, target)
        return result


def check(workspace: Workspace | str | Path | None, ref: str, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK
          ) -> tuple[str, list[Finding]]:
    """vLLM's verdict on a registered version's adapter (nothing written): (NAME@VERSION, findings)."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    with quiet_downloads(), tempfile.TemporaryDirectory(prefix="tuneline-check-") as tmp:
        fetched = fetch(ws, ref, Path(tmp))
        return fetched.ref, check_vllm(fetched.folder, max_lora_rank)


def _write(fetched: Fetched, ws: Workspace, fmt: str, staged: Path, options: ExportOptions) -> list[str]:
    if fmt == "peft":
        return export_peft(fetched, staged)
    if fmt == "merged":
        return export_merged(fetched, ws, staged, base=options.base, dtype=options.dtype)
    if options.gguf_kind == "lora":
        return write_lora_gguf(fetched, ws, staged, base=options.base, dtype=options.gguf_dtype or "f32")
    model, tokenizer = merged_model(fetched, ws, "gguf", options.base)
    return write_model_gguf(model, tokenizer, staged, fetched, dtype=options.gguf_dtype or "f16")


def _fresh(out: Path) -> Path:
    """``out``, refused when something is already there (an export never overwrites)."""
    out = out.expanduser().resolve()
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise ExportError(Problem(f"{out} already exists", field="--out", hint="choose another --out, or remove it"))
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _publish(staged: Path, target: Path) -> None:
    """Move the finished export into place (a folder durably, as adapters are written)."""
    if staged.is_dir():
        if target.is_dir():
            target.rmdir()  # empty (checked by _fresh)
        replace_dir(staged, target)
    else:
        staged.replace(target)
