"""The local workspace (``.tuneline/`` by default): model cache, run folders, tracking store.

Every path inside the workspace is named here, and nowhere else::

    .tuneline/
      models/               converted base models (safetensors)
      datasets/<id>/        dataset versions (curated splits, manifest, rejects, data card)
      runs/<spec>/          the latest run of a spec: run.json, checkpoints/, adapter/, reports
      embeddings/           cached sentence encoders and retrieval indexes
      studies.db, studies/  hyperparameter searches (Optuna) and their trial folders
                            (the studies in $TUNELINE_DATABASE_URL when set)
      compare/<spec>/       `tuneline compare`: compare.json and a folder per combination (adapter, results)
      mlflow.db, mlartifacts/  the local MLflow tracking store and its artifacts (unless
                            $TUNELINE_TRACKING_URI names a team's tracking server); a new store
                            is copied from an empty one in ~/.cache/tuneline (seed_tracking_store)
      requests.db           the server's request and feedback log (or $TUNELINE_DATABASE_URL)
      feedback/<name>/      harvested feedback rows, retraining inputs, production adapters fetched
      adapters/<sha256>/    registered adapters `tuneline serve` downloaded, by their recorded tree hash
      reports/              HTML reports written by `tuneline report`
      audit.db              the hash-chained audit trail (or $TUNELINE_AUDIT_URL, else $TUNELINE_DATABASE_URL)
      erasure/              erasure requests as keyed digests (never the erased text) and their secret key
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tuneline.artifacts import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_DIRNAME = ".tuneline"
RUN_STATE = "run.json"
# A team's MLflow tracking server (or any MLflow tracking URI): every command's runs, registry,
# promotions and lineage go there instead of the workspace's own mlflow.db (docs/team.md)
TRACKING_URI_ENV = "TUNELINE_TRACKING_URI"
# A team's database (a SQLAlchemy URL, e.g. PostgreSQL): the search studies, the request log and the
# audit trail go there instead of the workspace's SQLite files; their tables do not overlap
DATABASE_URL_ENV = "TUNELINE_DATABASE_URL"
EVAL_REPORT = "eval_report.json"
BASELINE_REPORT = "baseline_report.json"


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

    def run_state(self, spec_name: str) -> RunState:
        """What a spec's latest run recorded for resuming it (its MLflow run id, fingerprint)."""
        return RunState(self.run_dir(spec_name) / RUN_STATE)

    @property
    def adapters_dir(self) -> Path:
        """Registered adapters downloaded for serving, one folder per recorded tree hash (reused
        across restarts; from a team's tracking server, each is fetched once per machine)."""
        return self._dir("adapters")

    @property
    def embeddings_dir(self) -> Path:
        """Sentence encoders converted once, and retrieval indexes per dataset version and encoder."""
        return self._dir("embeddings")

    @property
    def reports_dir(self) -> Path:
        """HTML reports (`tuneline report`)."""
        return self._dir("reports")

    @property
    def ray_dir(self) -> Path:
        """Ray Train's storage for ``train.backend: ray`` (unless ``train.ray.storage`` names another)."""
        return self._dir("ray")

    @property
    def stems_dir(self) -> Path:
        """Frozen-layer states of trainings with ``train.lora.layers`` (the newest two), reused by a later
        run on the same rows and base model (:class:`tuneline.train.stem.StemStore`)."""
        return self._dir("stems")

    @property
    def studies_dir(self) -> Path:
        """Trial folders of hyperparameter searches, one folder per study."""
        return self._dir("studies")

    def compare_dir(self, spec_name: str) -> Path:
        """`tuneline compare` of a spec: its latest compare.json and one folder per combination."""
        return self._dir("compare", spec_name)

    @property
    def studies_url(self) -> str:
        """The Optuna storage of the searches: ``$TUNELINE_DATABASE_URL``, else SQLite beside ``mlflow.db``."""
        return self._database("studies.db")

    @property
    def requests_url(self) -> str:
        """The server's request and feedback log when no other store is given:
        ``$TUNELINE_DATABASE_URL``, else SQLite in the workspace."""
        return self._database("requests.db")

    @property
    def has_request_log(self) -> bool:
        """Whether :attr:`requests_url` names a log that may hold requests (a team's database, or a
        ``requests.db`` a server of this workspace wrote)."""
        return bool(os.environ.get(DATABASE_URL_ENV)) or (self.root / "requests.db").is_file()

    def feedback_dir(self, model_name: str) -> Path:
        """Harvested feedback of a model (``harvest-*.jsonl``), the files a retraining curates, and
        the production adapter it is compared with."""
        return self._dir("feedback", model_name)

    @property
    def feedback_root(self) -> Path:
        """The folder of every model's :meth:`feedback_dir`."""
        return self._dir("feedback")

    @property
    def audit_url(self) -> str:
        """The audit trail when ``$TUNELINE_AUDIT_URL`` names no other store: ``$TUNELINE_DATABASE_URL``,
        else SQLite in the workspace."""
        return self._database("audit.db")

    def _database(self, sqlite_file: str) -> str:
        return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{self.root / sqlite_file}"

    @property
    def erasure_dir(self) -> Path:
        """Erasure requests (``tuneline data forget``): keyed digests that curation filters rows
        by, and the workspace's secret key for them (mode 0600)."""
        return self._dir("erasure")

    @property
    def tracking_uri(self) -> str:
        """``$TUNELINE_TRACKING_URI`` when set (a team's tracking server), else the workspace's own store
        (created from :func:`seed_tracking_store`'s empty store when the workspace has none yet)."""
        if self.team_tracking_uri:
            return self.team_tracking_uri
        seed_tracking_store(self.root / "mlflow.db", self.artifact_root)
        return self.local_tracking_uri

    @property
    def team_tracking_uri(self) -> str | None:
        """``$TUNELINE_TRACKING_URI``, a team's tracking server, when set."""
        return os.environ.get(TRACKING_URI_ENV) or None

    @property
    def local_tracking_uri(self) -> str:
        """The workspace's own MLflow store (SQLite), its artifacts in :attr:`artifact_root`."""
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self._dir("mlartifacts")

    def _dir(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


@dataclass(frozen=True)
class RunState:
    """``runs/<spec>/run.json``: the MLflow run a spec's latest run tracks into, and the fingerprint
    a checkpoint must match to be resumed. Written atomically; missing means no run yet."""

    path: Path

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    @property
    def mlflow_run_id(self) -> str | None:
        return self.read().get("mlflow_run_id")

    def write(self, **values: Any) -> None:
        atomic_write_text(self.path, json.dumps(values, indent=2))


def seed_tracking_store(path: Path, artifact_root: Path) -> bool:
    """Create the workspace's MLflow store at ``path``, when there is none, as a copy of an empty
    store made once per MLflow version (in ``$XDG_CACHE_HOME/tuneline``, else ``~/.cache/tuneline``).

    MLflow creates a new SQLite store by running its schema migrations, 2-3 s of a first command in
    every new workspace (up to 8 s on a busy machine); the copy takes milliseconds. The copy is what
    MLflow would have made, but for its ``Default`` experiment, which is given ``artifact_root/0``
    and the current time. Returns whether it made the store; False (MLflow then creates it itself)
    when ``path`` exists, or when the empty store cannot be made or read (a read-only home, say)."""
    if path.exists():
        return False
    try:
        template = _empty_tracking_store()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, tmp)
        try:
            now = int(time.time() * 1000)
            with contextlib.closing(sqlite3.connect(tmp)) as db, db:
                changed = db.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, "
                                     "last_update_time = ? WHERE experiment_id = 0",
                                     (str(artifact_root.resolve() / "0"), now, now)).rowcount
            if changed != 1:  # not a store MLflow made: made again next time
                template.unlink(missing_ok=True)
                raise ValueError(f"{template} holds no Default experiment")
            os.link(tmp, path)  # never over a store another process made meanwhile
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as e:  # a shortcut only: whatever went wrong, MLflow creates the store as it would have
        log.debug("no seeded MLflow store for %s (%s: %s): MLflow creates it", path, type(e).__name__, e)
        return False
    return True


def _empty_tracking_store() -> Path:
    """The empty MLflow store of the installed MLflow version, made on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneline"
    template = cache / f"mlflow-{version('mlflow')}-new-store.db"
    if template.is_file():
        return template
    from mlflow.store.tracking.sqlalchemy_store import (
        SqlAlchemyStore,  # lazy: only the first store of a version
    )

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        db = Path(tmp) / "mlflow.db"
        SqlAlchemyStore(f"sqlite:///{db}", str(Path(tmp) / "artifacts")).engine.dispose()
        os.replace(db, template)
    return template
