"""Golden sets: named, frozen evaluation sets, registered with their content hash.

The first time a spec's golden set is used it is registered as version 1: its SHA-256, row
count and a frozen copy of the file go to ``<workspace>/golden/<spec>/<name>/``. Every later use
checks the file on disk against the latest registered hash and refuses a changed file, so two
evaluations that name the same golden version scored the same rows. An intended change is
registered as the next version with ``tuneline golden register SPEC NAME``.

Golden rows are never trained on: curation's decontamination step checks training rows against
them as it does against the validation and test splits.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.data import read_golden_examples
from tuneline.data.examples import Example
from tuneline.errors import DataError, Problem, TunelineError
from tuneline.spec.loader import LoadedSpec
from tuneline.spec.models import GoldenSetSpec


class GoldenSetChanged(TunelineError):
    """A golden set's file no longer matches its registered version."""


@dataclass
class GoldenSet:
    name: str
    version: int
    sha256: str
    path: str  # as written in the spec
    examples: list[Example]


def golden_dir(root: Path, spec_name: str, name: str) -> Path:
    return root / "golden" / spec_name / name


def registered_versions(root: Path, spec_name: str, name: str) -> list[dict[str, Any]]:
    path = golden_dir(root, spec_name, name) / "versions.json"
    return json.loads(path.read_text()) if path.is_file() else []


def load_golden(loaded: LoadedSpec, g: GoldenSetSpec, workspace_root: Path) -> GoldenSet:
    """The golden set as registered; registers version 1 on first use; refuses a changed file."""
    examples, sha = read_golden_examples(loaded, g)
    versions = registered_versions(workspace_root, loaded.spec.name, g.name)
    if not versions:
        entry = _register(loaded, g, workspace_root, sha, len(examples), versions)
        return GoldenSet(g.name, entry["version"], sha, g.path, examples)
    latest = versions[-1]
    if latest["sha256"] != sha:
        raise GoldenSetChanged(Problem(
            f"golden set {g.name!r} changed on disk since it was registered as version {latest['version']} "
            f"on {latest['registered']} (sha256 {latest['sha256'][:12]} -> {sha[:12]}, "
            f"{latest['rows']} -> {len(examples)} rows); a golden set is frozen, so it was not used",
            where=g.path, field=f"eval.golden.{g.name}",
            hint=f"restore the file (the registered copy is {latest['copy']}), or register the change as version "
                 f"{latest['version'] + 1} with `tuneline golden register {loaded.path} {g.name}`"))
    return GoldenSet(g.name, latest["version"], sha, g.path, examples)


def register_golden(loaded: LoadedSpec, name: str, workspace_root: Path) -> tuple[dict[str, Any], bool]:
    """Register the golden set's current file as a new version (no-op when unchanged).

    Returns the version entry and whether a new version was created."""
    g = next((x for x in loaded.spec.eval.golden if x.name == name), None)
    if g is None:
        raise DataError(Problem(f"no golden set named {name!r}", field="eval.golden",
                                hint=f"the spec declares {[x.name for x in loaded.spec.eval.golden]}"))
    examples, sha = read_golden_examples(loaded, g)
    versions = registered_versions(workspace_root, loaded.spec.name, name)
    if versions and versions[-1]["sha256"] == sha:
        return versions[-1], False
    return _register(loaded, g, workspace_root, sha, len(examples), versions), True


def _register(loaded: LoadedSpec, g: GoldenSetSpec, root: Path, sha: str, rows: int,
              versions: list[dict[str, Any]]) -> dict[str, Any]:
    folder = golden_dir(root, loaded.spec.name, g.name)
    folder.mkdir(parents=True, exist_ok=True)
    version = versions[-1]["version"] + 1 if versions else 1
    source = loaded.resolve(g.path)
    copy = folder / f"v{version}{source.suffix}"
    shutil.copyfile(source, copy)
    entry = {"version": version, "sha256": sha, "rows": rows, "path": g.path, "copy": str(copy),
             "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    versions = [*versions, entry]
    tmp = folder / "versions.json.tmp"
    tmp.write_text(json.dumps(versions, indent=2))
    tmp.replace(folder / "versions.json")
    return entry
