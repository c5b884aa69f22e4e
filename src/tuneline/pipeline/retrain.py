"""``tuneline retrain NAME`` and ``tuneline feedback harvest NAME``: the model in production,
retrained on what users corrected, behind the same gates as every run.

:func:`retrain`:

1. finds NAME's production version in the registry, fetches its adapter, and takes its spec (the
   ``tuneline.yaml`` shipped with the adapter, read from where the spec was when it trained; or the
   spec given) and its recipe: the production run's training parameters (``train.*`` as logged,
   a search's chosen values over them; no new search);
2. builds the merged dataset: the production dataset version's training rows plus every harvested
   row (:mod:`tuneline.monitor.harvest`) not trained on yet, with the production version's
   validation and test splits as they were, through curation again (deduplication and
   decontamination apply to the union); refuses with fewer than
   ``monitor.retrain.min_new_rows`` new rows;
3. trains and evaluates it with the stages of ``tuneline run`` (:func:`~tuneline.pipeline.commands.run_stages`),
   the production adapter scored beside it (``eval.production``), and registers it (alias
   ``candidate``);
4. promotes it only when ``monitor.retrain.auto_promote`` is on and every gate passed; otherwise
   it waits for ``tuneline promote NAME VERSION``.

The merged version's :data:`~tuneline.registry.FEEDBACK_LINKS` lists the request ids behind its
harvested rows, so ``tuneline lineage`` shows requests -> dataset version -> model version.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError
from rich.console import Console

from tuneline import registry, tracking
from tuneline.artifacts import ADAPTER_SHA_TAG, tree_matches
from tuneline.audit import trail_of
from tuneline.context import context_of, workspace_of
from tuneline.curation import DatasetVersion, load_version
from tuneline.errors import Problem
from tuneline.monitor.harvest import (
    FeedbackError,
    HarvestResult,
    HarvestRow,
    derived_spec,
    example_record,
    harvest,
    harvested_versions,
    write_links,
    write_records,
    write_sidecar,
)
from tuneline.monitor.store import RequestLog
from tuneline.pipeline.commands import RunResult, WorkspaceRef, run_stages
from tuneline.registry import GATE_NOT_EVALUATED, GATE_PASSED, VersionInfo
from tuneline.spec import LoadedSpec, load_spec
from tuneline.spec.loader import parse_spec
from tuneline.spec.models import TrainSpec
from tuneline.spec.monitor import RetrainSpec
from tuneline.tune.space import apply_params
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from tuneline.eval import EvalSuite

PROMOTED_REASON = "retrain: auto-promoted, gates passed"


@dataclass(frozen=True)
class Production:
    """NAME's production version: its registry entry, its adapter fetched into the workspace, the
    spec it trained with (or the one given) and its run's parameters."""

    info: VersionInfo
    adapter_dir: Path
    loaded: LoadedSpec
    params: dict[str, str]
    uri: str


def production_of(name: str, ws: Workspace, spec: str | Path | None = None) -> Production:
    """Find NAME's production version, fetch its adapter (hash-checked), and load its spec."""
    import mlflow

    given = load_spec(spec) if spec is not None else None
    uri = tracking.tracking_uri(given, ws)
    info = registry.resolve(uri, name)
    adapter_dir = _fetch_adapter(info, ws)
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(info.run_id) if info.run_id else None
    params = dict(run.data.params) if run else {}
    loaded = given or _shipped_spec(adapter_dir, (run.data.tags if run else {}).get("tuneline.spec_path"))
    if loaded.spec.name != name:
        raise FeedbackError(Problem(f"the spec is for model {loaded.spec.name!r}, not {name!r}",
                                    where=str(loaded.path), field="name",
                                    hint=f"pass the spec of {name!r} with --spec, or leave --spec out"))
    return Production(info, adapter_dir, loaded, params, uri)


def _fetch_adapter(info: VersionInfo, ws: Workspace) -> Path:
    """The version's adapter in ``feedback/<NAME>/production-<VERSION>/``, fetched once and checked
    against the hash it was registered with."""
    import mlflow

    dest = ws.feedback_dir(info.name) / f"production-{info.version}"
    found = [p.parent for p in dest.rglob("adapter_config.json")] if dest.is_dir() else []
    folder = found[0] if found else Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source,
                                                                             dst_path=str(dest)))
    want = info.tags.get(ADAPTER_SHA_TAG)
    if want and not tree_matches(folder, want):
        raise FeedbackError(Problem(f"the adapter of {info.name} version {info.version} at {folder} does not match "
                                    "the hash it was registered with", hint=f"delete {dest} and retry"))
    return folder


def _shipped_spec(adapter_dir: Path, spec_path: str | None) -> LoadedSpec:
    """The spec shipped with an adapter, its relative paths resolved from where the spec file was
    when it trained (else from the adapter folder)."""
    shipped = adapter_dir / "tuneline.yaml"
    if not shipped.is_file():
        raise FeedbackError(Problem(f"no tuneline.yaml in the production adapter {adapter_dir}",
                                    hint="pass the model's spec with --spec"))
    text = shipped.read_text(encoding="utf-8")
    home = Path(spec_path) if spec_path and Path(spec_path).parent.is_dir() else shipped
    return LoadedSpec(parse_spec(text, where=str(shipped)), home, text)


def recipe(prod: Production, console: Console) -> TrainSpec:
    """The production run's training configuration: its logged ``train.*`` parameters (over the
    spec's train section) with a search's chosen values (``search.best.*``) applied."""
    spec = prod.loaded.spec
    logged: dict[str, object] = {}
    for key, value in prod.params.items():
        if key.startswith("train."):
            _set_nested(logged, key.removeprefix("train.").split("."), _param_value(value))
    train = spec.train
    if logged:
        try:
            train = TrainSpec.model_validate({**spec.train.model_dump(), **logged})
        except ValidationError as exc:
            console.print(f"[yellow]the production run's train.* parameters do not form a train section "
                          f"({exc.error_count()} problems); training with the spec's[/]")
    best = {k.removeprefix("search.best."): v for k, v in prod.params.items() if k.startswith("search.best.")}
    if best:
        space = spec.search.space if spec.search is not None else {}
        chosen = {path: _searched_value(value, space[path].choices if path in space else None)
                  for path, value in best.items()}
        train = apply_params(train, chosen)
    return train


def _param_value(text: str) -> object:
    """A logged MLflow parameter (always a string) back as the value it was."""
    special: dict[str, object] = {"None": None, "True": True, "False": False}
    if text in special:
        return special[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _searched_value(text: str, choices: list[str | bool | int | float] | None) -> str | bool | int | float:
    if choices is not None:
        return next((c for c in choices if str(c) == text), text)
    value = _param_value(text)
    return value if isinstance(value, (str, bool, int, float)) else text


def _set_nested(d: dict[str, object], path: list[str], value: object) -> None:
    for part in path[:-1]:
        inner = d.get(part)
        if not isinstance(inner, dict):
            inner = d[part] = {}
        d = inner
    d[path[-1]] = value


# ---------------------------------------------------------------------- the merged dataset


@dataclass
class Merged:
    """The files of the merged dataset and which of its training lines came from feedback."""

    folder: Path
    files: dict[str, Path | None]  # data section -> file (None: the base version has no such split)
    base: DatasetVersion
    labels: list[str] | None
    lines: dict[int, HarvestRow] = field(default_factory=dict)  # line (1-based) of train.jsonl -> its links
    new_lines: set[int] = field(default_factory=set)  # the lines of harvested rows not trained on before
    harvests: list[str] = field(default_factory=list)

    @property
    def new_rows(self) -> int:
        return len(self.new_lines)


def base_version(prod: Production, ws: Workspace) -> DatasetVersion:
    ds = prod.info.tags.get("tuneline.dataset_version")
    if not ds:
        raise FeedbackError(Problem(
            f"{prod.info.name} version {prod.info.version} has no dataset version (it trained with curation off)",
            hint="retraining merges the harvested rows into the production version's dataset version; "
                 "train the model with curation on"))
    return load_version(ds, ws.datasets_dir)


def merge_feedback(prod: Production, ws: Workspace) -> Merged:
    """Write the production version's training rows plus the harvested rows not trained on yet,
    and its validation and test splits, as JSONL files of the task's columns."""
    task = prod.loaded.spec.task.type
    base = base_version(prod, ws)
    trained_on = _links_of(base)
    rows: dict[str, HarvestRow] = {}
    for i, ex in enumerate(base.split("train")):
        record = example_record(task, ex)
        if record is not None:
            _unite(rows, HarvestRow(record, "correction", *trained_on.get(i, ([], []))))
    seen = {fid for r in rows.values() for fid in r.feedback_ids}
    new: set[str] = set()  # keys of the rows feedback adds
    harvests = []
    for h in harvested_versions(ws, prod.info.name):
        links = h.row_links()
        for i, ex in enumerate(h.version.split("train")):
            link, record = links.get(i), example_record(task, ex)
            if link is None or record is None or set(link["feedback_ids"]) <= seen:
                continue
            if _unite(rows, HarvestRow(record, link["kind"], list(link["request_ids"]), list(link["feedback_ids"]))):
                new.add(_key(record))
            harvests.append(h.version.id)
    merged = _write_merged(ws, prod, base, list(rows.values()), sorted(set(harvests)))
    merged.new_lines = {i + 1 for i, r in enumerate(rows.values()) if _key(r.record) in new}
    return merged


def _links_of(version: DatasetVersion) -> dict[int, tuple[list[str], list[int]]]:
    """A version's training rows that came from feedback (a previous retraining): row -> ids."""
    path = version.path / registry.FEEDBACK_LINKS
    links = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    return {int(r["row"]): (list(r["request_ids"]), list(r["feedback_ids"])) for r in links["rows"]}


def _key(record: dict[str, object]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def _unite(rows: dict[str, HarvestRow], row: HarvestRow) -> bool:
    """Add ``row`` (or its ids to the same row already there); True when it is a new row."""
    key = _key(row.record)
    have = rows.get(key)
    if have is None:
        rows[key] = row
        return True
    have.request_ids = sorted({*have.request_ids, *row.request_ids})
    have.feedback_ids = sorted({*have.feedback_ids, *row.feedback_ids})
    return False


def _write_merged(ws: Workspace, prod: Production, base: DatasetVersion, rows: list[HarvestRow],
                  harvests: list[str]) -> Merged:
    task = prod.loaded.spec.task.type
    train = [{**r.record, "request_ids": r.request_ids} if r.request_ids else r.record for r in rows]
    digest = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:12]
    folder = ws.feedback_dir(prod.info.name) / f"retrain-{base.id}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path | None] = {"train": write_records(folder / "train.jsonl", train)}
    for section, split in (("eval", "validation"), ("test", "test")):
        records = [r for r in (example_record(task, ex) for ex in base.split(split)) if r is not None]
        files[section] = write_records(folder / f"{split}.jsonl", records) if records else None
    lines = {i + 1: r for i, r in enumerate(rows) if r.request_ids}
    # declared labels stay the label set; inferred ones are inferred again, new labels included
    labels = prod.loaded.spec.task.labels
    return Merged(folder, files, base, list(labels) if labels else None, lines, set(), harvests)


def retrain_spec(prod: Production, merged: Merged, train: TrainSpec) -> LoadedSpec:
    """The production spec training on the merged files with the production recipe (no search),
    evaluated beside the production adapter; written beside the files (the adapter ships it), its
    relative paths (golden sets) still resolved from the production spec's folder."""
    derived = derived_spec(prod.loaded, {k: v for k, v in merged.files.items() if v is not None}, merged.labels)
    data = derived.spec.data.model_copy(update={k: None for k, v in merged.files.items() if v is None and k != "train"})
    spec = derived.spec.model_copy(update={
        "data": data, "train": train, "search": None,
        "eval": derived.spec.eval.model_copy(update={"production": str(prod.adapter_dir)})})
    body = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True)
    text = (f"# tuneline retrain of {prod.info.name} version {prod.info.version} (dataset {merged.base.id} + "
            f"harvested feedback); spec folder {prod.loaded.base_dir}\n{body}")
    (merged.folder / "tuneline.yaml").write_text(text)
    return LoadedSpec(parse_spec(text, where=str(merged.folder / "tuneline.yaml")), prod.loaded.path, text)


def link_version(version: DatasetVersion, merged: Merged, prod: Production) -> tuple[int, int]:
    """Write the merged version's feedback links and sidecar; return its training rows from
    feedback, and how many of them are new (not trained on before)."""
    train_file = str(merged.files["train"])
    kept: list[tuple[int, HarvestRow]] = []
    new = 0
    for i, ex in enumerate(version.split("train")):
        path, _, line = ex.where.rpartition(":")
        if path == train_file and line.isdigit() and int(line) in merged.lines:
            kept.append((i, merged.lines[int(line)]))
            new += int(line) in merged.new_lines
    write_links(version.path, prod.info.name, kept, {f for _, r in kept for f in r.feedback_ids}, merged.harvests)
    write_sidecar(version.path, {
        "kind": "retrain", "model": prod.info.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "production_version": prod.info.version, "base_dataset_version": merged.base.id,
        "harvests": merged.harvests, "new_rows": merged.new_rows, "files": str(merged.folder)})
    return len(kept), new


# ---------------------------------------------------------------------- retrain


@dataclass
class RetrainResult:
    model: str
    production_version: int
    candidate_version: int | None
    dataset_version: str | None
    base_dataset_version: str
    new_rows: int  # harvested rows not trained on before
    feedback_rows: int  # training rows of the merged version that came from feedback
    request_ids: list[str]
    gate_state: str
    promoted: bool
    run: RunResult

    @property
    def report(self) -> EvalSuite | None:
        return self.run.report

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "production_version": self.production_version,
                "candidate_version": self.candidate_version, "dataset_version": self.dataset_version,
                "base_dataset_version": self.base_dataset_version, "new_rows": self.new_rows,
                "feedback_rows": self.feedback_rows, "request_ids": self.request_ids, "gate_state": self.gate_state,
                "promoted": self.promoted, "run_id": self.run.run_id, "seconds": self.run.seconds,
                "report": self.report.to_dict(with_rows=False) if self.report is not None else None}


def _too_few(name: str, n: int, policy: RetrainSpec, when: str) -> FeedbackError:
    return FeedbackError(Problem(
        f"{n} new harvested rows {when}, fewer than monitor.retrain.min_new_rows = {policy.min_new_rows}: "
        "nothing retrained", field="monitor.retrain.min_new_rows",
        hint=f"collect corrections and run `tuneline feedback harvest {name}` first, or lower min_new_rows"))


def retrain(name: str, workspace: WorkspaceRef = None, *, spec: str | Path | None = None,
            console: Console | None = None, show_progress: bool = True) -> RetrainResult:
    """Retrain NAME's production version on its dataset plus the harvested feedback; register the
    candidate; promote it when the spec's policy allows and every gate passed."""
    started = time.perf_counter()
    ws, console = workspace_of(workspace), console or Console()
    prod = production_of(name, ws, spec)
    policy = prod.loaded.spec.monitor.retrain
    merged = merge_feedback(prod, ws)
    erased = bool(prod.info.erasures)  # rows were erased from its data: retrain without new feedback too
    if merged.new_rows < policy.min_new_rows and not erased:
        raise _too_few(name, merged.new_rows, policy, "since the production version's dataset")
    console.print(f"retraining {name} (production version {prod.info.version}, dataset {merged.base.id}) with "
                  f"{merged.new_rows} new rows from feedback"
                  + (f", without the rows of erasures {', '.join(prod.info.erasures)}" if erased else ""), soft_wrap=True)
    ctx = context_of(retrain_spec(prod, merged, recipe(prod, console)), ws, console=console,
                     show_progress=show_progress)
    if ctx.version is None:
        raise FeedbackError(Problem("curation is off in the spec: harvested rows cannot be linked to their requests",
                                    field="curation.enabled", hint="turn curation on to retrain from feedback"))
    kept, new_kept = link_version(ctx.version, merged, prod)
    if new_kept < policy.min_new_rows and not erased:
        raise _too_few(name, new_kept, policy, "left after curation (duplicates and evaluation rows are dropped)")
    result = run_stages(ctx, started=started)
    gates = registry.gate_state_of(result.report) if result.report is not None else GATE_NOT_EVALUATED
    promoted = _promote_by_policy(prod, result, gates, console, ctx.workspace)
    links = json.loads((ctx.version.path / registry.FEEDBACK_LINKS).read_text())
    return RetrainResult(name, prod.info.version, result.model_version, ctx.version.id, merged.base.id,
                         merged.new_rows, kept, list(links["request_ids"]), gates, promoted, result)


def _promote_by_policy(prod: Production, result: RunResult, gates: str, console: Console, ws: Workspace) -> bool:
    name, version = prod.info.name, result.model_version
    if version is None:
        return False
    if prod.loaded.spec.monitor.retrain.auto_promote and gates == GATE_PASSED:
        trail = trail_of(ws)
        try:
            registry.promote(prod.uri, name, version, reason=PROMOTED_REASON, trail=trail)
        finally:
            trail.close()
        console.print(f"[green]promoted[/] {name} version {version} to production ({PROMOTED_REASON})")
        return True
    why = ("monitor.retrain.auto_promote is off" if gates == GATE_PASSED
           else f"its gates are {gates}: it cannot be promoted without --force --reason")
    console.print(f"{name} version {version} waits for `tuneline promote {name} {version}` ({why})")
    return False


# ---------------------------------------------------------------------- harvest by model name


def harvest_model(name: str, workspace: WorkspaceRef = None, *, spec: str | Path | None = None,
                  request_log: RequestLog | str | None = None, everything: bool = False) -> HarvestResult:
    """``tuneline feedback harvest NAME``: the feedback on NAME's logged answers as a new dataset
    version, curated under the spec given or, without one, the spec of NAME's production version
    (whose dataset version's labels are then the label set before the harvest; corrections must
    name one of ``task.labels`` only where the spec declares them)."""
    ws = workspace_of(workspace)
    labels = None
    if spec is not None:
        loaded = load_spec(spec)
    else:
        prod = production_of(name, ws)
        loaded = prod.loaded
        if loaded.spec.task.type == "classification" and prod.info.tags.get("tuneline.dataset_version"):
            labels = base_version(prod, ws).manifest.get("labels")
    if loaded.spec.name != name:
        raise FeedbackError(Problem(f"the spec is for model {loaded.spec.name!r}, not {name!r}",
                                    where=str(loaded.path), field="name", hint=f"pass the spec of {name!r}"))
    if request_log is not None and not isinstance(request_log, str):
        return harvest(loaded, ws, request_log, everything=everything, labels=labels)
    store = RequestLog(request_log or ws.requests_url)
    try:
        return harvest(loaded, ws, store, everything=everything, labels=labels)
    finally:
        store.close()


__all__ = ["PROMOTED_REASON", "Production", "RetrainResult", "harvest_model", "merge_feedback", "production_of",
           "recipe", "retrain"]
