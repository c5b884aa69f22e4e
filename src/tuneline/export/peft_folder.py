"""``--format peft``: the registered adapter folder as any PEFT user loads it, without tuneline's
own files. The base is named by hub id in adapter_config.json (``base_model_name_or_path``) and,
with the weights' fingerprint, in base_model.json; README.md is the Hugging Face model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneline import __version__
from tuneline.artifacts import (
    ADAPTER_SHA_TAG,
    CARD_FILE,
    MLFLOW_META_FILE,
    ArtifactError,
    file_sha256,
    fsync_tree,
    tree_sha256,
)
from tuneline.errors import Problem
from tuneline.eval.generate import DECODING_FILE
from tuneline.export.source import ENV_FILE, MLMODEL, REQUIREMENTS_FILE, ExportError, Fetched

SPEC_FILE = "tuneline.yaml"
RETRIEVAL_DIR = "retrieval"
EXPORT_RECORD = "export.json"  # in every export: what it was made from and how
# tuneline's own files: the spec (its data paths are this machine's), the served decoding settings,
# a hybrid's retrieval index, the files that make the version an MLflow model loaded through
# tuneline (and what MLflow wrote when it loaded one); nothing a PEFT loader reads
INTERNAL = frozenset({SPEC_FILE, DECODING_FILE, RETRIEVAL_DIR, MLMODEL, ENV_FILE, REQUIREMENTS_FILE, MLFLOW_META_FILE})


def export_peft(fetched: Fetched, out: Path) -> list[str]:
    """Copy the adapter folder minus :data:`INTERNAL` into ``out``, each file checked against the
    verified download; return notes for the user."""
    if fetched.method == "full":
        raise ExportError(Problem(f"{fetched.ref} is a full fine-tune: there is no adapter to export",
                                  hint="use --format merged (the model itself), gguf or mlflow"))
    out.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for path in sorted(fetched.folder.iterdir()):
        if path.name in INTERNAL or path.name == EXPORT_RECORD:
            continue
        target = out / path.name
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)
            if file_sha256(target) != file_sha256(path):
                raise ArtifactError(Problem(f"{target} differs from the verified {path} after copying",
                                            hint="check the disk and export again"))
        copied.append(path.name)
    write_record(out, fetched, "peft", {"files": copied})
    notes = [] if (out / CARD_FILE).is_file() else [f"{fetched.ref} has no model card (registered before cards)"]
    if (fetched.folder / RETRIEVAL_DIR).is_dir():
        notes.append("this version answers with retrieved examples (hybrid): the exported adapter alone does not "
                     "retrieve, so its answers differ from `tuneline serve`'s")
    return notes


def write_record(out: Path, fetched: Fetched, fmt: str, details: dict[str, object]) -> None:
    """export.json: the version, its verified adapter hash, the base and the format, then fsync."""
    record = {"model": fetched.info.name, "version": fetched.info.version, "format": fmt,
              "adapter_sha256": fetched.info.tags.get(ADAPTER_SHA_TAG), "method": fetched.method,
              "base_model": fetched.base_record, "tuneline": __version__, **details}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    fsync_tree(out)


def exported_sha256(out: Path) -> str:
    """The tree hash of an export (without its card), as the registry hashes adapters."""
    return tree_sha256(out)
