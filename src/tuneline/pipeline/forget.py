"""``tuneline data forget``: carry out an erasure request across the workspace.

1. every stored dataset version loses the matching rows (:mod:`tuneline.curation.forget`; ids
   stay, manifests record the erasure, the copies runs logged as MLflow artifacts follow). With a
   shared tracking store (a team's server), the versions other machines logged there are fetched
   first, erased here, and uploaded over every run's copy;
2. the request log loses the matching requests and feedback, and the feedback folders the
   matching harvested rows and retraining inputs (:mod:`tuneline.monitor.erasure`);
3. the request is stored as a keyed digest (:mod:`tuneline.curation.erasure`), so ``data
   prepare``, ``run``, ``feedback harvest`` and ``retrain`` drop such rows from then on: the
   user's source files are not edited, and the lines of them that still match are reported;
4. the model versions trained on a version that lost rows are tagged ``tuneline.erasure.<id>``
   (``tuneline models`` shows them) until ``tuneline retrain NAME`` replaces them;
5. one audit entry ``data.forget`` records the erasure id, the dataset versions and model versions
   it touched and counts per place -- never the erased text nor a hash of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tuneline import registry, tracking
from tuneline.audit import trail_of
from tuneline.context import FULL_ID, stored_version
from tuneline.curation.erasure import Query, example_view, new_erasure_id, record_erasure
from tuneline.curation.forget import VersionErasure, erase_versions, residue
from tuneline.data.examples import build_examples
from tuneline.data.readers import read_records
from tuneline.errors import DataError
from tuneline.monitor.erasure import LogErasure, erase_feedback_files, erase_log
from tuneline.monitor.store import RequestLog
from tuneline.spec import load_spec
from tuneline.train.stem import StemStore
from tuneline.workspace import Workspace

ACTION = "data.forget"
log = logging.getLogger(__name__)


@dataclass
class ForgetResult:
    """What an erasure removed (or, in a dry run, would remove), place by place."""

    erasure_id: str
    dry_run: bool
    query: Query
    versions: list[VersionErasure] = field(default_factory=list)
    log: LogErasure | None = None  # None: the workspace has no request log
    files: dict[str, int] = field(default_factory=dict)  # feedback file -> lines removed
    models: list[registry.VersionInfo] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # source lines (file:line) that still hold matching rows
    residue: list[str] = field(default_factory=list)  # other workspace files still holding matching text
    fetched: list[str] = field(default_factory=list)  # versions fetched from the tracking store to be erased
    stems: int = 0  # stored frozen-layer states (the workspace's stems/) removed: computed from training rows

    @property
    def affected(self) -> list[str]:
        """The dataset versions that lost rows of their splits."""
        return [v.id for v in self.versions if v.rows]

    def counts(self) -> dict[str, object]:
        """Counts per place (no content): what the audit entry and ``--json`` hold."""
        return {
            "request": {"mode": self.query.mode, "column": self.query.column},
            "datasets": {v.id: {"rows": v.removed, "rejects": v.rejects, "conflicts": v.conflicts,
                                "other_files": v.other_rows, "mlflow_artifacts": v.artifacts} for v in self.versions},
            "requests": self.log.requests if self.log else 0,
            "feedback": self.log.feedback if self.log else 0,
            "feedback_files": {Path(p).name: n for p, n in self.files.items()},
            "models_marked": len(self.models),
            "source_lines_still_matching": len(self.sources),
            "workspace_files_still_matching": len(self.residue),
            "versions_fetched": len(self.fetched),
            "stems": self.stems,
        }


def forget(ws: Workspace, query: Query, *, dry_run: bool = False, uri: str | None = None,
           requests_url: str | None = None, specs: tuple[Path, ...] = ()) -> ForgetResult:
    """Carry out (or, ``dry_run``, only measure) the erasure ``query`` in workspace ``ws``.
    ``uri``: the MLflow registry (default: the workspace's, when it has one); ``requests_url``:
    the request log (default: the workspace's ``requests.db``, when there); ``specs``: spec files
    whose sources are scanned for lines that still match."""
    result = ForgetResult(new_erasure_id(), dry_run, query)
    if uri is not None or ws.team_tracking_uri or (ws.root / "mlflow.db").is_file():  # a store to erase from
        uri = uri or ws.tracking_uri
    shared = uri is not None and uri != ws.local_tracking_uri  # a team's server (or another workspace's store)
    if not dry_run:  # first: should a step below fail, later versions already drop the rows, and a rerun finishes
        record_erasure(ws, query, result.erasure_id)
    if shared:  # the versions other machines logged there: fetched, to be erased here and replaced there
        assert uri is not None
        result.fetched = _fetch_logged_versions(ws, uri)
    result.versions = erase_versions(ws.datasets_dir, query, result.erasure_id, artifact_root=ws.artifact_root,
                                     dry_run=dry_run)
    if shared and not dry_run:
        assert uri is not None
        _replace_logged_copies(ws, uri, result.versions)
    if requests_url is not None or ws.has_request_log:
        log = RequestLog(requests_url or ws.requests_url)
        try:
            result.log = erase_log(log, query, dry_run=dry_run)
        finally:
            log.close(timeout=30)
    result.files = erase_feedback_files(ws.feedback_root, query, dry_run=dry_run)
    if uri is not None:
        result.models = (registry.trained_on(uri, result.affected) if dry_run
                         else registry.mark_erasure(uri, result.affected, result.erasure_id))
    result.sources = _source_lines(result.versions, specs, query)
    if result.affected:
        result.stems = _drop_stems(ws, dry_run)
    if not dry_run:
        result.residue = residue(ws.root, query, skip=(ws.erasure_dir,))
        _audit(ws, result)
    return result


def _drop_stems(ws: Workspace, dry_run: bool) -> int:
    """Remove every stored stem (frozen-layer states of training rows: vectors, not text, but computed
    from the rows; a cache the next training computes again); how many (would be) removed."""
    stems = StemStore(ws.stems_dir).stored()
    if not dry_run:
        for path in stems:
            path.unlink(missing_ok=True)
    return len(stems)


def _fetch_logged_versions(ws: Workspace, uri: str) -> list[str]:
    """Fetch into this workspace every dataset version a run of the store ``uri`` logged that is
    not here yet (made on another machine); their ids."""
    here = {p.name for p in ws.datasets_dir.iterdir()}
    fetched = []
    for vid in dict.fromkeys(v for _, v in tracking.runs_with_dataset(uri)):
        if vid not in here and FULL_ID.fullmatch(vid):
            try:
                stored_version(vid, ws, uri)
            except DataError as e:  # an older run logged only the manifest and card: no rows there to erase
                log.info("dataset version %s: %s", vid, e)
                continue
            fetched.append(vid)
    return fetched


def _replace_logged_copies(ws: Workspace, uri: str, versions: list[VersionErasure]) -> None:
    """Upload each erased version over the ``dataset/`` artifacts of every run of ``uri`` that
    logged it (the artifact store overwrites each file); counted in ``artifacts``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for v in versions:
        if not v.touched:
            continue
        folder = ws.datasets_dir / v.id
        for run_id, _ in tracking.runs_with_dataset(uri, v.id):
            client.log_artifacts(run_id, str(folder), tracking.DATASET_ARTIFACTS)
            v.artifacts += 1


def _source_lines(versions: list[VersionErasure], specs: tuple[Path, ...], query: Query) -> list[str]:
    """Where the erased rows were read from (as the versions recorded it), and the lines of the
    given specs' source files that match now."""
    found = dict.fromkeys(w for v in versions for w in v.where)
    for spec_path in specs:
        loaded = load_spec(spec_path)
        for section in ("train", "eval", "test"):
            src = getattr(loaded.spec.data, section)
            if src is None:
                continue
            path = loaded.resolve(src.path)
            try:
                read = read_records(path, src.resolved_format(), display=str(path))
            except DataError:
                continue
            examples, _ = build_examples(loaded.spec.task, src, read.records)
            found.update(dict.fromkeys(ex.where for ex in examples if query.hits(example_view(ex))))
    return list(found)


def _audit(ws: Workspace, result: ForgetResult) -> None:
    outputs = {"erasure": result.erasure_id}
    outputs.update({f"dataset.{ds}": ds for ds in result.affected})
    outputs.update({f"model.{m.name}/{m.version}": f"{m.name}/{m.version}" for m in result.models})
    trail = trail_of(ws)
    try:
        trail.append(ACTION, subject=f"erasure:{result.erasure_id}", outputs=outputs, details=result.counts())
    finally:
        trail.close()


__all__ = ["ACTION", "ForgetResult", "forget"]
