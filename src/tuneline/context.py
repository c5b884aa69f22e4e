"""The context every stage of a run works in: one spec, its workspace, base model source, tokenizer,
curated data and where tensors are computed.

:func:`open_context` builds it (load the spec, resolve the model, load the tokenizer, curate the data
into a dataset version); the stages of :mod:`tuneline.pipeline`, the search (:mod:`tuneline.tune`)
and the baselines take it instead of loose bundles of arguments.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tuneline.audit import Pending, audited
from tuneline.curation import DatasetVersion, PreparedData, prepare, save_version
from tuneline.curation.erasure import load_filter
from tuneline.curation.prepared import prepared_from
from tuneline.curation.version import adopt_version, load_version
from tuneline.errors import DataError, Problem
from tuneline.models import ModelSource, load_tokenizer, resolve_model_source
from tuneline.runtime import Compute
from tuneline.runtime.extras import require_extras_for
from tuneline.spec import LoadedSpec, load_spec
from tuneline.spec.models import Spec
from tuneline.tracking import DATASET_ARTIFACTS, fetch_dataset, tracking_uri
from tuneline.workspace import Workspace

FULL_ID = re.compile(r"ds-[0-9a-f]{16}")  # a dataset version's whole id (what another machine can look up)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class RunContext:
    """A spec opened for work. ``compute`` follows the spec's own ``train`` section; a search may pick
    another configuration, whose compute :class:`tuneline.pipeline.stages.TrainingPlan` holds."""

    workspace: Workspace
    loaded: LoadedSpec
    source: ModelSource
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    version: DatasetVersion | None
    compute: Compute
    console: Console = field(default_factory=Console)
    show_progress: bool = True

    @property
    def spec(self) -> Spec:
        return self.loaded.spec

    @property
    def version_id(self) -> str | None:
        return self.version.id if self.version is not None else None

    @property
    def run_dir(self) -> Path:
        """The folder of the spec's latest run (checkpoints, adapter, reports)."""
        return self.workspace.run_dir(self.spec.name)


def workspace_of(workspace: str | Path | Workspace | None) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)


def open_context(spec_path: str | Path, workspace: str | Path | Workspace | None = None, *,
                 console: Console | None = None, show_progress: bool = True, trains: bool = True,
                 dataset: str | None = None) -> RunContext:
    """Load the spec, resolve its base model and tokenizer, curate its data into a dataset version
    (or, with ``dataset``, take that stored version: :func:`stored_version`).
    ``trains``: the command may search, so the extras a ``search`` section needs must be installed."""
    return context_of(load_spec(spec_path), workspace, console=console, show_progress=show_progress, trains=trains,
                      dataset=dataset)


def context_of(loaded: LoadedSpec, workspace: str | Path | Workspace | None = None, *, console: Console | None = None,
               show_progress: bool = True, trains: bool = True, dataset: str | None = None) -> RunContext:
    """:func:`open_context` for a spec already loaded (e.g. one derived from another, as retraining does)."""
    ws = workspace_of(workspace)
    if trains:
        require_extras_for(loaded.spec)  # a search needs [tune] (and [ray]): say so before any work
    source = resolve_model_source(loaded.spec.model, loaded.base_dir)
    tokenizer = load_tokenizer(source, ws.models_dir)
    if dataset is None:
        data, version = prepare_version(loaded, ws, tokenizer)
    else:
        version = stored_version(dataset, ws, tracking_uri(loaded, ws))
        data = prepared_from(version, loaded)
    return RunContext(ws, loaded, source, tokenizer, data, version,
                      Compute.resolve(loaded.spec.train.precision, loaded.spec.train.method),
                      console or Console(), show_progress)


def prepare_version(loaded: LoadedSpec, ws: Workspace, tokenizer: PreTrainedTokenizerBase | None = None,
                    ) -> tuple[PreparedData, DatasetVersion | None]:
    """Curate the spec's data, without the rows of the workspace's erasure requests, and store it
    as a dataset version (unless curation is disabled)."""
    if tokenizer is None:
        source = resolve_model_source(loaded.spec.model, loaded.base_dir)
        tokenizer = load_tokenizer(source, ws.models_dir)
    with audited(ws, "data.prepare", subject=f"spec:{loaded.spec.name}", inputs={"spec": loaded.sha256}) as entry:
        data = prepare(loaded, tokenizer, load_filter(ws))
        if data.curated is None or not loaded.spec.curation.enabled:
            entry.details["curation"] = "off"
            return data, None
        existed = {p.name for p in ws.datasets_dir.iterdir()}
        version = save_version(data.curated, ws.datasets_dir, loaded.spec.name, loaded.sha256)
        _describe_version(entry, version, new=version.id not in existed)
    return data, version


def stored_version(ref: str, ws: Workspace, uri: str) -> DatasetVersion:
    """Dataset version ``ref`` (an id, or a unique prefix of one here) from this workspace, or else
    fetched whole from the newest run of the tracking store ``uri`` that logged it, checked against
    its id, and kept in this workspace (another machine's version: ``tuneline data pull``)."""
    try:
        return load_version(ref, ws.datasets_dir)
    except DataError as e:
        if not FULL_ID.fullmatch(ref):
            raise DataError([*e.problems, Problem("to fetch a version a run logged to the tracking store, give "
                                                  "its whole id (ds- and 16 hex digits)")]) from e
    with audited(ws, "data.pull", subject=f"dataset:{ref}") as entry:
        tmp = Path(tempfile.mkdtemp(prefix=f".{ref}-fetch-", dir=ws.datasets_dir))
        try:
            empty = uri == ws.local_tracking_uri and not (ws.root / "mlflow.db").is_file()  # nothing to look in
            run_id = None if empty else fetch_dataset(uri, ref, tmp)
            if run_id is None:
                raise DataError(Problem(f"no dataset version {ref} in {ws.datasets_dir}, and no run of the tracking "
                                        "store logged it", hint="list this workspace's versions with `tuneline data "
                                        "list`; set TUNELINE_TRACKING_URI to the store of the run that made it"))
            version = adopt_version(tmp / DATASET_ARTIFACTS, ws.datasets_dir, ref)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        entry.inputs["run"] = run_id
        entry.outputs["dataset"] = version.id
        entry.details["counts"] = version.manifest["counts"]
    return version


def _describe_version(entry: Pending, version: DatasetVersion, *, new: bool) -> None:
    """The audit entry of a curation: source files by hash, the version id, counts (never rows)."""
    m = version.manifest
    splits = [s["split"] for s in m["sources"]]
    for i, src in enumerate(m["sources"]):
        key = f"sources.{src['split']}" + (f".{i}" if splits.count(src["split"]) > 1 else "")
        entry.inputs[key] = src["sha256"]
    entry.outputs["dataset"] = version.id
    entry.details.update(new=new, counts=m["counts"], rejected=m["rejected"], dropped=m["dropped_by_reason"],
                         pii_found=m["pii_found"])


def curation_summary(version: DatasetVersion | None) -> str:
    """One line: the version id, rows per split, drops per reason, PII found."""
    if version is None:
        return "curation off"
    m = version.manifest
    rows = ", ".join(f"{k} {v:,}" for k, v in m["counts"].items() if v)
    dropped = ", ".join(f"{k} {v:,}" for k, v in m["dropped_by_reason"].items()) or "none"
    pii = ", ".join(f"{k} {v:,}" for k, v in m["pii_found"].items()) or "none"
    return f"dataset {version.id}: {rows}; dropped: {dropped}; PII redacted: {pii}"
