"""MLflow tracking: every run records its spec, data, code and library versions, metrics and adapter.

The default store is SQLite inside the workspace, with artifacts in the workspace too (MLflow would
otherwise write ``./mlruns`` relative to the current directory). A team sets ``tracking.uri`` to
an MLflow server instead.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict

from tuneline.errors import Problem, SpecError
from tuneline.spec.loader import LoadedSpec
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from mlflow import ActiveRun
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

TRACKED_LIBRARIES = ("tuneline", "torch", "transformers", "peft", "mlflow", "pydantic", "scikit-learn")


class DataSourceInfo(Protocol):
    """A data file a run read (:class:`tuneline.curation.SourceInfo`; tracking sits below curation)."""

    @property
    def split(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def rows_used(self) -> int: ...


class ManifestCounts(TypedDict):
    """What tracking reads of a dataset version's manifest (:class:`tuneline.curation.version.Manifest`)."""

    counts: dict[str, int]
    rejected: int


class StoredDatasetVersion(Protocol):
    """A stored dataset version (:class:`tuneline.curation.DatasetVersion`)."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def manifest(self) -> ManifestCounts: ...
    @property
    def card(self) -> Path: ...


class RunRow(TypedDict):
    """A run as :func:`list_runs` lists it."""

    run_id: str
    experiment: str
    name: str | None
    status: str
    start_time: int
    metrics: dict[str, float]
    tags: dict[str, str]


def tracking_uri(loaded: LoadedSpec | None, workspace: Workspace) -> str:
    if loaded is not None and loaded.spec.tracking.uri:
        return loaded.spec.tracking.uri
    return workspace.tracking_uri


def start_run(loaded: LoadedSpec, workspace: Workspace, run_name: str | None = None) -> ActiveRun:
    """Point MLflow at the store, create the experiment (artifacts in the workspace), start a run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(loaded, workspace))
    name = loaded.spec.tracking.experiment or loaded.spec.name
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = artifact_location(workspace, tracking_uri(loaded, workspace), name, loaded)
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    return mlflow.start_run(experiment_id=exp_id, run_name=run_name)


def start_or_resume(loaded: LoadedSpec, workspace: Workspace, run_id: str | None = None,
                    run_name: str | None = None) -> ActiveRun:
    """Resume MLflow run ``run_id`` in the spec's store, or start a new run when ``run_id`` is None.
    Use as a context manager, like :func:`mlflow.start_run`."""
    import mlflow

    if run_id is None:
        return start_run(loaded, workspace, run_name=run_name)
    mlflow.set_tracking_uri(tracking_uri(loaded, workspace))
    return mlflow.start_run(run_id=run_id)


class MetricBatcher:
    """Per-step training metrics for one run, written in batches: one SQLite commit costs ~25 ms
    here, so writing every step's values one by one would slow training. Call it as the trainer's
    ``on_step``; values are flushed every ``every`` steps and on :meth:`flush` (or leaving ``with``)."""

    def __init__(self, run_id: str, every: int) -> None:
        self.run_id, self.every = run_id, max(1, every)
        self.pending: list[Metric] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            import mlflow

            mlflow.MlflowClient().log_batch(self.run_id, metrics=self.pending)
            self.pending.clear()

    def __enter__(self) -> MetricBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def run_metric(loaded: LoadedSpec, workspace: Workspace, run_id: str, key: str, default: float = 0.0) -> float:
    """One metric's last value of a run in the spec's store (``default`` when it has none)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(loaded, workspace))
    return float(client.get_run(run_id).data.metrics.get(key, default))


def artifact_location(workspace: Workspace, uri: str, name: str, loaded: LoadedSpec | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: a folder of the workspace when ``uri`` is the
    workspace's own store; else None, the tracking server's default (a team's server proxies its
    artifact store, so another machine downloads what this one logged)."""
    return experiment_folder(workspace, name, loaded).as_uri() if uri == workspace.local_tracking_uri else None


def experiment_folder(workspace: Workspace, name: str, loaded: LoadedSpec | None = None) -> Path:
    """The artifact folder of experiment ``name``: one folder directly in the workspace's artifact
    root, whatever the name (the spec refuses names with '/', '\\' or '..'; this is checked again
    here, for a spec built in code)."""
    root = workspace.artifact_root.resolve()
    folder = (root / name).resolve()
    if folder.parent != root or not name.strip():
        where = str(loaded.path) if loaded is not None else None
        raise SpecError(Problem(
            f"experiment name {name!r} would put its artifacts outside the workspace ({folder})",
            where=where, field="tracking.experiment",
            hint="use letters, digits, spaces and _ . - + @ = , only"))
    return folder


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in TRACKED_LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def git_sha(path: Path) -> str | None:
    """Commit of the repository holding ``path`` (with '-dirty' if it has changes), if any."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(d: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def log_run_inputs(loaded: LoadedSpec, data_sources: Sequence[DataSourceInfo], model_ref: str, model_fingerprint: str) -> None:
    """Spec (artifact, hash, params), data file hashes, model identity, code and library versions."""
    import mlflow

    params = flatten(loaded.spec.model_dump(mode="json", exclude={"tracking"}))
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
    mlflow.log_text(loaded.text, "spec/tuneline.yaml")
    tags = {
        "tuneline.spec_sha256": loaded.sha256,
        "tuneline.spec_path": str(loaded.path),
        "tuneline.task": loaded.spec.task.type,
        "tuneline.model": model_ref,
        "tuneline.model_fingerprint": model_fingerprint,
    }
    sha = git_sha(loaded.base_dir)
    if sha:
        tags["mlflow.source.git.commit"] = sha
    for s in data_sources:
        tags[f"tuneline.data.{s.split}.path"] = s.path
        tags[f"tuneline.data.{s.split}.sha256"] = s.sha256
        tags[f"tuneline.data.{s.split}.rows_used"] = str(s.rows_used)
    tags.update({f"tuneline.version.{k}": v for k, v in library_versions().items()})
    mlflow.set_tags(tags)


DATASET_ARTIFACTS = "dataset"  # where a run keeps its dataset version (:func:`log_dataset_version`)
DATASET_TAG = "tuneline.dataset_version"


def log_dataset_version(version: StoredDatasetVersion) -> None:
    """The curated dataset version as MLflow dataset inputs (train: context training, validation and
    test: evaluation), its id as a tag, and the whole version as artifacts (``dataset/``: the splits,
    rejects, manifest, data card), so another machine can train on it (:func:`fetch_dataset`)."""
    import mlflow
    import pandas as pd  # type: ignore[import-untyped]

    for split, context in (("train", "training"), ("validation", "validation"), ("test", "evaluation")):
        path = version.path / f"{split}.parquet"
        if not version.manifest["counts"].get(split):
            continue
        df = pd.read_parquet(path)
        with warnings.catch_warnings():  # MLflow registers two same-named local sources and warns about it
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]
                df, source=str(path), name=f"{version.id}/{split}")
        mlflow.log_input(dataset, context=context)
    mlflow.set_tags({DATASET_TAG: version.id, "tuneline.dataset_rejected": str(version.manifest["rejected"])})
    mlflow.log_artifacts(str(version.path), DATASET_ARTIFACTS)


def runs_with_dataset(uri: str, version_id: str | None = None) -> list[tuple[str, str]]:
    """(run id, dataset version id) of every run of the store ``uri`` that logged a dataset version
    (``version_id``: only that one), newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.`{DATASET_TAG}` = '{version_id}'" if version_id else f"tags.`{DATASET_TAG}` != ''"
    out, token = [], None
    while experiments:
        page = client.search_runs(experiments, where, max_results=1000, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        out += [(r.info.run_id, r.data.tags[DATASET_TAG]) for r in page]
        token = page.token
        if not token:
            break
    return out


def fetch_dataset(uri: str, version_id: str, dest: Path) -> str | None:
    """Download dataset version ``version_id`` from the newest run of the store ``uri`` that logged it
    whole (older runs logged only its manifest and card) into ``dest``; the run's id,
    or None when no run holds it."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for run_id, _ in runs_with_dataset(uri, version_id):
        names = {Path(f.path).name for f in client.list_artifacts(run_id, DATASET_ARTIFACTS)}
        if {"manifest.json", "train.parquet"} <= names:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=DATASET_ARTIFACTS, dst_path=str(dest),
                                                tracking_uri=uri)
            return run_id
    return None


def list_runs(workspace: Workspace, uri: str | None = None, max_results: int = 50,
              include_trials: bool = False, run_id_prefix: str | None = None) -> list[RunRow]:
    """Recent runs across experiments of the store, newest first (search trials left out unless asked;
    only runs whose id starts with ``run_id_prefix`` when given)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri or workspace.tracking_uri)
    client = MlflowClient()
    exps = client.search_experiments()
    if not exps:
        return []
    names = {e.experiment_id: e.name for e in exps}
    rows: list[RunRow] = []
    token = None
    while len(rows) < max_results:
        page = client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time DESC"],
                                  max_results=max(max_results, 100), page_token=token)
        for r in page:
            if not include_trials and r.data.tags.get("tuneline.kind") == "search-trial":
                continue
            if run_id_prefix and not r.info.run_id.startswith(run_id_prefix):
                continue
            rows.append({
                "run_id": r.info.run_id,
                "experiment": names.get(r.info.experiment_id, r.info.experiment_id),
                "name": r.info.run_name,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "metrics": dict(r.data.metrics),
                "tags": dict(r.data.tags),
            })
        token = page.token
        if not token:
            break
    return rows[:max_results]


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar per downloaded file (noise on the console); an explicit setting is honoured."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ.setdefault(key, "false")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
