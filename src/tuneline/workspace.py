"""The local workspace (``.tuneline/`` by default): model cache, run folders, tracking store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIRNAME = ".tuneline"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> Workspace:
        """The workspace at ``root``, else ``$TUNELINE_HOME``, else ``./.tuneline``."""
        chosen = root or os.environ.get("TUNELINE_HOME") or DEFAULT_DIRNAME
        path = Path(chosen).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def models_dir(self) -> Path:
        """Converted base models (safetensors), so a GGUF is dequantized only once."""
        return self._dir("models")

    @property
    def datasets_dir(self) -> Path:
        """Dataset versions: curated Parquet splits, manifest, rejects, data card per version id."""
        return self._dir("datasets")

    @property
    def runs_dir(self) -> Path:
        return self._dir("runs")

    def run_dir(self, spec_name: str) -> Path:
        """Folder of the latest run of a spec: checkpoints, adapter, reports."""
        return self._dir("runs", spec_name)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self._dir("mlartifacts")

    def _dir(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p
