"""``tuneline report RUN``: find a tracked run, load what it logged, write its page.

The run is found by id or unique prefix (:func:`find_run`, over :func:`tuneline.tracking.list_runs`);
its ``eval/report.json`` is required, the spec, dataset manifest, search summary and loss histories
are shown when the run has them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.errors import Problem, TunelineError
from tuneline.eval.results import EvalSuite
from tuneline.report.render import render_html
from tuneline.tracking import list_runs
from tuneline.tune.study import SearchResult
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

MIN_PREFIX = 6  # shortest run id prefix accepted
MAX_MATCHES = 1000  # runs counted for an ambiguous prefix
LOSS_METRICS = ("train_loss", "eval_loss")
EVAL_REPORT = "eval/report.json"
SPEC = "spec/tuneline.yaml"
MANIFEST = "dataset/manifest.json"
SEARCH = "search/summary.json"
COMPARE = "compare/compare.json"  # `tuneline compare`'s run
RUN_TAGS = (("tuneline.model", "model"), ("tuneline.dataset_version", "dataset version"),
            ("mlflow.source.git.commit", "git commit"))


@dataclass
class RunArtifacts:
    """What a run logged that the page shows."""

    suite: EvalSuite
    spec_text: str | None = None
    dataset: dict[str, object] | None = None
    search: SearchResult | None = None
    comparison: dict[str, object] | None = None


def write_report(run_ref: str, workspace: str | Path | None = None, out: Path | None = None, *,
                 uri: str | None = None) -> Path:
    """Render the tracked run ``run_ref`` (id or unique prefix) as HTML; return the file written.

    Default file: ``<workspace>/reports/<run id>.html``. ``uri`` overrides the tracking store (by
    default the workspace's SQLite store).
    """
    from mlflow.tracking import MlflowClient

    ws = Workspace.at(workspace)
    store = uri or ws.tracking_uri
    client = MlflowClient(tracking_uri=store)
    run = find_run(client, ws, run_ref, store)
    run_id = run.info.run_id
    logged = load_artifacts(client, run_id)
    page = render_html(logged.suite, title=f"tuneline report: {logged.suite.spec} ({run_id[:12]})",
                       spec_text=logged.spec_text, dataset=logged.dataset, loss_curves=loss_curves(client, run_id),
                       run_info=run_info(client, run), search=logged.search,
                       comparison=logged.comparison)
    path = Path(out) if out is not None else ws.reports_dir / f"{run_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def find_run(client: MlflowClient, ws: Workspace, ref: str, uri: str) -> Run:
    """The run whose id is ``ref`` or starts with it (at least :data:`MIN_PREFIX` characters)."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip().lower()
    if not ref:
        raise TunelineError(Problem("no run id given", hint="list runs with `tuneline runs`"))
    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    if len(ref) < MIN_PREFIX:
        raise TunelineError(Problem(f"run id prefix {ref!r} is too short",
                                    hint=f"give at least {MIN_PREFIX} characters; list runs with `tuneline runs`"))
    matches = [r["run_id"] for r in list_runs(ws, uri, max_results=MAX_MATCHES, include_trials=True,
                                              run_id_prefix=ref)]
    if len(matches) == 1:
        return client.get_run(matches[0])
    if not matches:
        raise TunelineError(Problem(f"no run {ref!r} in the tracking store {uri}",
                                    hint="list runs with `tuneline runs` (and pass the same --workspace)"))
    raise TunelineError(Problem(f"{len(matches)} runs start with {ref!r}: {', '.join(matches[:5])}",
                                hint="give more characters of the run id"))


def load_artifacts(client: MlflowClient, run_id: str) -> RunArtifacts:
    """The run's evaluation (required), spec, dataset manifest and search summary."""
    if EVAL_REPORT not in _artifact_paths(client, run_id, EVAL_REPORT):
        raise TunelineError(Problem(f"run {run_id} has no evaluation report (artifact {EVAL_REPORT})",
                                    hint="run `tuneline eval SPEC` first, then `tuneline report` again"))
    with tempfile.TemporaryDirectory(prefix="tuneline-report-") as tmp:
        tmp_dir = Path(tmp)
        raw = json.loads(_download_text(client, run_id, EVAL_REPORT, tmp_dir))
        try:
            logged = RunArtifacts(EvalSuite.from_dict(raw))
        except (KeyError, TypeError) as e:
            raise TunelineError(Problem(
                f"run {run_id}: {EVAL_REPORT} is not an evaluation suite ({type(e).__name__}: {e})",
                hint="it was probably written by an older tuneline; run `tuneline eval SPEC` to re-evaluate")) from e
        if SPEC in _artifact_paths(client, run_id, SPEC):
            logged.spec_text = _download_text(client, run_id, SPEC, tmp_dir)
        if MANIFEST in _artifact_paths(client, run_id, MANIFEST):
            logged.dataset = json.loads(_download_text(client, run_id, MANIFEST, tmp_dir))
        if SEARCH in _artifact_paths(client, run_id, SEARCH):
            logged.search = SearchResult.from_dict(json.loads(_download_text(client, run_id, SEARCH, tmp_dir)))
        if COMPARE in _artifact_paths(client, run_id, COMPARE):
            logged.comparison = json.loads(_download_text(client, run_id, COMPARE, tmp_dir))
    return logged


def loss_curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The run's logged losses: metric name -> (step, value) points."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key in LOSS_METRICS:
        history = client.get_metric_history(run_id, key)
        if history:
            curves[key] = [(int(m.step), float(m.value)) for m in history]
    return curves


def run_info(client: MlflowClient, run: Run) -> dict[str, str]:
    """The run's facts for the header: id, experiment, name, status, start, model, data, commit."""
    exp = client.get_experiment(run.info.experiment_id)
    tags = run.data.tags
    info = {"run id": run.info.run_id, "experiment": exp.name if exp else run.info.experiment_id}
    if run.info.run_name:
        info["run name"] = run.info.run_name
    info["status"] = run.info.status
    if run.info.start_time:
        started = dt.datetime.fromtimestamp(run.info.start_time / 1000, tz=dt.UTC)
        info["started"] = started.strftime("%Y-%m-%d %H:%M:%S UTC")
    for tag, label in RUN_TAGS:
        if tags.get(tag):
            info[label] = tags[tag]
    return info


def _artifact_paths(client: MlflowClient, run_id: str, path: str) -> set[str]:
    """The artifact paths in the folder of ``path``."""
    try:
        return {a.path for a in client.list_artifacts(run_id, path.rpartition("/")[0])}
    except Exception:  # a missing folder raises on some artifact stores
        return set()


def _download_text(client: MlflowClient, run_id: str, path: str, dest: Path) -> str:
    # a progress bar per small file is noise on the console; honour an explicit setting
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ.setdefault(key, "false")
    try:
        local = client.download_artifacts(run_id, path, str(dest))
    finally:
        if saved is None:
            os.environ.pop(key, None)
    return Path(local).read_text(encoding="utf-8")
