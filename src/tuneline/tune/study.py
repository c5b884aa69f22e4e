"""The search: an Optuna study (TPE sampling, pruning) in the workspace, resumable, each trial an
MLflow child run of the search run; trials in this process, in worker processes, or on Ray.

The study lives in ``<workspace>/studies.db`` (SQLite), beside the MLflow store ``mlflow.db``
rather than inside it: Optuna and MLflow each keep their schema revision in a table named
``alembic_version``, so one file cannot hold both (each refuses the other's revision). The study
is found by its name, a hash of what the trials' results depend on (search and train sections,
task, dataset version, base model), so the same spec on the same data continues the same study.

A team's database (``$TUNELINE_DATABASE_URL``, e.g. PostgreSQL) holds the studies of every machine:
``tuneline tune SPEC`` started on a second machine while a search runs joins it, and both take
trials from the one study until its budget is spent. There a running trial sends a heartbeat
(:data:`HEARTBEAT_S`); one silent for :data:`GRACE_S` (its worker was killed) is failed as
interrupted and queued again by whichever worker notices, never a trial another worker is running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline import tracking
from tuneline.context import RunContext
from tuneline.curation import PreparedData
from tuneline.data import Example
from tuneline.errors import Problem, TrainingError
from tuneline.eval.validate import sample_rows
from tuneline.runtime.progress import QuietWhenPiped, progress_bar
from tuneline.spec.loader import LoadedSpec
from tuneline.spec.models import SearchSpec, Spec, TrainSpec
from tuneline.train.loop import encode_all
from tuneline.tune.ray_backend import run_ray
from tuneline.tune.sampling import make_pruner, make_sampler
from tuneline.tune.space import ParamValue, apply_params, default_params, max_validations, suggest
from tuneline.tune.trial import TrialContext, TrialPruned, run_trial
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from optuna import Study, Trial
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.trial import FrozenTrial
    from rich.console import Console

log = logging.getLogger(__name__)

# fANOVA on fewer complete trials than this ranks parameters by noise
MIN_TRIALS_FOR_IMPORTANCE = 4


@dataclass
class TrialRow:
    number: int
    state: str  # complete, pruned, failed, running, waiting
    params: dict[str, ParamValue]
    value: float | None
    validations: list[tuple[int, float]]
    seconds: float | None
    retry_of: int | None = None
    interrupted: bool = False
    mlflow_run_id: str | None = None
    attempts: int = 1


@dataclass
class SearchResult:
    study_name: str
    backend: str
    metric: str
    direction: str
    trials_wanted: int
    trials: list[TrialRow]
    best: TrialRow | None
    importances: dict[str, float] = field(default_factory=dict)
    default_params: dict[str, ParamValue] = field(default_factory=dict)
    reusable_adapter: str | None = None
    parent_run_id: str | None = None
    seconds: float = 0.0

    @property
    def best_params(self) -> dict[str, ParamValue]:
        return dict(self.best.params) if self.best else {}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchResult:
        rows = [TrialRow(**{**t, "validations": [tuple(v) for v in t["validations"]]}) for t in d["trials"]]
        best = next((r for r in rows if d.get("best") and r.number == d["best"]["number"]), None)
        return cls(**{**d, "trials": rows, "best": best})


def study_name(loaded: LoadedSpec, dataset_version: str | None, model_fingerprint: str) -> str:
    """The name of the study this spec's search continues: what the trials' results depend on."""
    spec = loaded.spec
    assert spec.search is not None
    search = spec.search.model_dump(mode="json")
    for irrelevant in ("workers", "timeout_minutes", "trials", "backend", "ray"):
        search.pop(irrelevant)
    # how a run on several processes splits the work changes no trial (and older studies keep their names)
    payload = json.dumps({"search": search, "train": spec.train.model_dump(mode="json", exclude={"distributed", "backend", "ray"}),
                          "task": spec.task.model_dump(mode="json"), "objective": spec.objective.primary,
                          # max_new_tokens moved to decoding; kept under "eval" so earlier studies keep their names
                          "eval": {**spec.eval.model_dump(mode="json", include={"batch_size", "constrain_to_labels"}),
                                   "max_new_tokens": spec.decoding.max_new_tokens},
                          "data": dataset_version, "model": model_fingerprint,
                          # the hybrid's trials train on other prompts (absent otherwise: older studies keep their names)
                          **({"retrieval": spec.retrieval.model_dump(mode="json")} if spec.retrieval else {}),
                          # the other decoding settings change validation scores (absent at their defaults)
                          **({"decoding": spec.decoding.model_dump(mode="json")}
                             if spec.decoding.model_dump(exclude={"max_new_tokens"})
                             != type(spec.decoding)().model_dump(exclude={"max_new_tokens"}) else {})},
                         sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


# --- running ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchOptions:
    """How to run a search: continue an interrupted one (``resume``), drop it and start over
    (``restart``), worker processes and trial budget overriding the spec's, and the MLflow run to
    hang the trials under (``tuneline run``'s own; a search alone gets a parent run of its own)."""

    resume: bool = False
    restart: bool = False
    workers: int | None = None
    trials: int | None = None
    parent_run_id: str | None = None


@dataclass(frozen=True)
class _Study:
    """One search's identity: its name, folder, storage, and what it optimizes."""

    name: str
    folder: Path
    url: str
    metric: str
    direction: str


def search(ctx: RunContext, *, data: PreparedData | None = None, options: SearchOptions | None = None) -> SearchResult:
    """Run (or continue, or reuse when finished) the spec's hyperparameter search on ``data``
    (default: the context's curated data; the hybrid passes its rows with retrieved examples)."""
    import optuna

    opts = options or SearchOptions()
    spec = ctx.spec
    if spec.search is None:
        raise TrainingError(Problem("the spec has no `search` section", field="search",
                                    hint="add search: {space: {lr: {type: loguniform, low: 1e-4, high: 3e-3}}, trials: 8}"))
    s = spec.search if opts.trials is None else spec.search.model_copy(update={"trials": opts.trials})
    metric = s.metric or spec.objective.primary
    name = study_name(ctx.loaded, ctx.version_id, ctx.source.fingerprint())
    study = _Study(name, ctx.workspace.studies_dir / name, ctx.workspace.studies_url, metric,
                   s.resolved_direction(metric))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(study.url)
    t0 = time.perf_counter()
    finished = _continue_or_reuse(ctx, s, study, storage, opts)
    if isinstance(finished, SearchResult):
        return finished
    exists = finished
    rows = data or ctx.data.with_canary_rows()  # trials train on what a run trains on: eval.canaries' rows too
    train_rows = rows.train
    if s.train_rows and s.train_rows < len(train_rows):
        train_rows = sample_rows(train_rows, s.train_rows, s.seed)
    trained_on_all = len(train_rows) == len(rows.train)
    if s.backend == "ray":
        parent = opts.parent_run_id or _new_parent_run(ctx.loaded, ctx.workspace, name)
        trial_ctx = _context(ctx, rows, study, parent, train_rows)
        optuna_study = run_ray(trial_ctx, s, storage, resume=opts.resume and (study.folder / "ray").exists(),
                               console=ctx.console)
        optuna_study.set_user_attr("mlflow_parent_run_id", parent)
        optuna_study.set_user_attr("trained_on_all", trained_on_all)
        optuna_study.set_user_attr("backend", "ray")
    else:
        parent = _local_study(ctx, study, storage, exists, trained_on_all, opts.parent_run_id)
        trial_ctx = _context(ctx, rows, study, parent, train_rows)
        _optimize_local(trial_ctx, s, study.url, opts.workers or s.workers, ctx.console, ctx.show_progress)
        optuna_study = optuna.load_study(study_name=name, storage=storage)
    result = summarize(optuna_study, s, metric, study.direction, backend=s.backend, spec=spec,
                       trained_on_all=trained_on_all, seconds=time.perf_counter() - t0)
    _record(result, study.folder, tracking.tracking_uri(ctx.loaded, ctx.workspace))
    return result


def _continue_or_reuse(ctx: RunContext, s: SearchSpec, study: _Study, storage: BaseStorage,
                       opts: SearchOptions) -> SearchResult | bool:
    """A finished study's result (reused), or whether an unfinished one exists and may continue;
    raises when one exists and ``resume`` was not asked for. ``restart`` deletes it first."""
    import optuna

    exists = study.name in optuna.study.get_all_study_names(storage)
    ray_dir = study.folder / "ray"
    if opts.restart:
        if exists:
            optuna.delete_study(study_name=study.name, storage=storage)
        shutil.rmtree(study.folder, ignore_errors=True)
        exists = False
    if exists:
        found = optuna.load_study(study_name=study.name, storage=storage)
        done = _finished(found)
        if done >= s.trials:
            if not is_shared(study.url):  # a shared study's running trials may be another machine's
                _close_interrupted(found, tracking.tracking_uri(ctx.loaded, ctx.workspace), retry=False)
            ctx.console.print(f"search {study.name}: {done} of {s.trials} trials already finished; reusing it "
                              "(`tuneline tune --restart` runs a new one)")
            return summarize(found, s, study.metric, study.direction, backend=_backend_of(found), spec=ctx.spec,
                             trained_on_all=bool(found.user_attrs.get("trained_on_all")), seconds=0.0)
        if is_shared(study.url):  # other machines may be running it: join, never close their trials
            optuna.storages.fail_stale_trials(found)
            ctx.console.print(f"search {study.name}: joining it ({done} of {s.trials} trials finished, "
                              f"{_live_trials(found)} running on other workers)")
            return True
        if not opts.resume:
            raise TrainingError(Problem(
                f"a search for this spec stopped after {done} of {s.trials} trials (study {study.name})",
                hint="continue it with `tuneline tune SPEC --resume` (or `tuneline run SPEC --resume`); "
                     "start over with `tuneline tune SPEC --restart`"))
    elif s.backend == "ray" and ray_dir.exists() and not opts.resume:
        raise TrainingError(Problem(
            f"a Ray search for this spec was interrupted (study {study.name}, {ray_dir})",
            hint="continue it with `tuneline tune SPEC --resume`; start over with `--restart`"))
    return exists


def _local_study(ctx: RunContext, study: _Study, storage: BaseStorage, exists: bool, trained_on_all: bool,
                 parent_run_id: str | None) -> str:
    """Create the Optuna study (the spec's own values queued as trial 0) or continue it after closing
    the trials a killed process left running; return the MLflow parent run of its trials."""
    import optuna

    spec = ctx.spec
    created = False
    if not exists:
        try:
            found = optuna.create_study(study_name=study.name, storage=storage,
                                        direction="maximize" if study.direction == "maximize" else "minimize")
            created = True
        except optuna.exceptions.DuplicatedStudyError:  # another machine created it a moment ago: join it
            found = optuna.load_study(study_name=study.name, storage=storage)
            ctx.console.print(f"search {study.name}: joining it (another worker has just started it)")
    else:
        found = optuna.load_study(study_name=study.name, storage=storage)
    if created:
        found.set_user_attr("trained_on_all", trained_on_all)
        found.set_user_attr("backend", "local")
        found.set_user_attr("spec", spec.name)
        if (defaults := default_params(spec)):
            found.enqueue_trial(defaults, user_attrs={"default": True})  # the hand-set values, as trial 0
    elif is_shared(study.url):
        optuna.storages.fail_stale_trials(found)  # other machines' live trials go on
    else:
        ctx.console.print(f"search {study.name}: resuming after {_finished(found)} finished trials")
        _close_interrupted(found, tracking.tracking_uri(ctx.loaded, ctx.workspace), retry=True)
    parent: str = (parent_run_id or found.user_attrs.get("mlflow_parent_run_id")
                   or (None if created or not is_shared(study.url) else _parent_of(found))
                   or _new_parent_run(ctx.loaded, ctx.workspace, study.name))
    found.set_user_attr("mlflow_parent_run_id", parent)
    return parent


def _parent_of(study: Study, wait_s: float = 60.0) -> str | None:
    """The search run of a shared study another worker has just created: it names it a moment after
    creating the study, and every worker's trials belong under that one run."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        parent = study.user_attrs.get("mlflow_parent_run_id")  # read from the storage on every call
        if parent:
            return str(parent)
        time.sleep(1.0)
    return None  # its creator is gone: this worker starts the search run


HEARTBEAT_S = 15  # a shared study's running trials report this often...
GRACE_S = 60  # ...and one silent this long is taken for a killed worker's


def is_shared(url: str) -> bool:
    """A study storage other machines may use at once (a database server, not a SQLite file)."""
    return not url.startswith("sqlite")


def open_storage(url: str) -> RDBStorage:
    """The Optuna storage at ``url``: a SQLite file waits for its lock; a shared database gets
    heartbeats, so a killed worker's trials are found and retried without touching live ones."""
    import optuna

    if not is_shared(url):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=GRACE_S, heartbeat_stale_trial_callback=_retry_stale)


def _retry_stale(study: Study, trial: FrozenTrial) -> None:
    """A trial whose worker stopped beating (Optuna already failed it): count it as interrupted, not
    as a trial that failed by itself, and queue its values again."""
    study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    log.info("trial %d stopped reporting (its worker was killed?); queued again", trial.number)


def _live_trials(study: Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _finished(study: Study) -> int:
    """Trials that count toward the budget: complete, pruned, or failed by themselves (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))


def _backend_of(study: Study) -> str:
    return str(study.user_attrs.get("backend", "local"))


def _close_interrupted(study: Study, uri: str, *, retry: bool) -> None:
    """Trials left running by a killed process: mark them failed (interrupted) and, with ``retry``,
    queue the same values again, so a resumed search reruns only what did not finish."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if retry:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log.info("trial %d was interrupted; %s", t.number, "queued again" if retry else "marked failed")
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            client = MlflowClient(uri)
            client.set_tag(run_id, "tuneline.trial_state", "interrupted")
            client.set_terminated(run_id, "FAILED")


def _new_parent_run(loaded: LoadedSpec, ws: Workspace, name: str) -> str:
    import mlflow

    with tracking.start_run(loaded, ws, run_name="search") as run:
        mlflow.set_tags({"tuneline.kind": "search", "tuneline.study": name})
        mlflow.log_dict(loaded.spec.model_dump(mode="json")["search"], "search/space.json")
        run_id: str = run.info.run_id
    return run_id


def _context(ctx: RunContext, data: PreparedData, study: _Study, parent: str,
             train_rows: list[Example]) -> TrialContext:
    """What every trial shares: the rows (tokenized once), the validation rows, where to track."""
    from mlflow.tracking import MlflowClient

    spec = ctx.spec
    assert spec.search is not None
    uri = tracking.tracking_uri(ctx.loaded, ctx.workspace)
    experiment_id = MlflowClient(uri).get_run(parent).info.experiment_id
    study.folder.mkdir(parents=True, exist_ok=True)
    if not data.eval:
        raise TrainingError(Problem(
            "a search scores trials on the validation split, and this spec has none",
            field="data.eval", hint="add data.eval, or set curation.split.validation above 0 (never search on the test set)"))
    return TrialContext(
        spec=spec, source=ctx.source, models_dir=ctx.workspace.models_dir, stems_dir=ctx.workspace.stems_dir,
        tokenizer=ctx.tokenizer,
        train=train_rows, encoded=encode_all(ctx.tokenizer, train_rows, spec.train.seq_len),  # once, for every trial
        validation=sample_rows(data.eval, spec.search.eval_rows, spec.search.seed), labels=data.labels,
        metric=study.metric, maximize=study.direction == "maximize", device=ctx.compute.device,
        study_name=study.name, study_dir=study.folder, tracking_uri=uri, experiment_id=experiment_id,
        parent_run_id=parent, trained_on_all=len(train_rows) == len(data.train))


def objective(ctx: TrialContext) -> Callable[[Trial], float]:
    """The Optuna objective: one trial's training, reporting each validation to the pruner."""
    import optuna

    assert ctx.spec.search is not None
    space = ctx.spec.search

    def run(trial: Trial) -> float:
        params = suggest(trial, space)

        def report(index: int, value: float, last: bool) -> None:
            trial.report(value, index)
            if not last and trial.should_prune():
                raise TrialPruned()

        trial.set_user_attr("started", time.time())
        # which machine and workspace trained it: in a team's shared study, trials come from several
        trial.set_user_attr("worker", f"{socket.gethostname()} {ctx.study_dir.parent.parent} pid {os.getpid()}")
        try:
            out = run_trial(ctx, f"{trial.number:04d}", params, report)
        except TrialPruned:
            raise optuna.TrialPruned() from None
        trial.set_user_attr("mlflow_run_id", out.mlflow_run_id)
        trial.set_user_attr("adapter_dir", out.adapter_dir)
        trial.set_user_attr("steps", out.steps)
        return out.value

    return run


class _Budget:
    """Stops a worker's optimize loop once the study has enough finished trials."""

    def __init__(self, trials: int) -> None:
        self.trials = trials

    def __call__(self, study: Study, _trial: FrozenTrial) -> None:
        if _finished(study) >= self.trials:
            study.stop()


def _optimize_local(ctx: TrialContext, s: SearchSpec, url: str, workers: int, console: Console, show_progress: bool) -> None:
    import optuna

    train_max = max_validations(s, ctx.spec.train)
    timeout = s.timeout_minutes * 60 if s.timeout_minutes else None
    if workers <= 1:
        study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(url), sampler=make_sampler(s),
                                  pruner=make_pruner(s, train_max))
        remaining = s.trials - _finished(study)
        printer = _TrialPrinter(console, ctx.metric)
        with _progress(show_progress, console) as bar:
            task = bar.add_task("search", total=s.trials, completed=_finished(study))

            def shown(st: Study, tr: FrozenTrial) -> None:
                printer(st, tr)
                bar.update(task, completed=min(s.trials, _finished(st)))

            if remaining > 0:
                study.optimize(objective(ctx), timeout=timeout, callbacks=[_Budget(s.trials), shown],
                               catch=(Exception,), gc_after_trial=True)
        return
    ctx_file = ctx.study_dir / "context.pkl"
    ctx_file.write_bytes(pickle.dumps(ctx))  # prepared once; every worker reads the same tokenized data
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [mp.get_context("spawn").Process(target=_worker, args=(str(ctx_file), url, s, i, threads, timeout),
                                             name=f"tuneline-trial-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(url))
    printer = _TrialPrinter(console, ctx.metric)
    seen: set[int] = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    with _progress(show_progress, console) as bar:
        task = bar.add_task(f"search ({workers} workers)", total=s.trials, completed=_finished(study))
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            for t in study.get_trials(deepcopy=False):
                if t.state.is_finished() and t.number not in seen:
                    seen.add(t.number)
                    printer(study, t)
            bar.update(task, completed=min(s.trials, _finished(study)))
    failed = [p for p in procs if p.exitcode]
    if failed:
        raise TrainingError(Problem(f"{len(failed)} search worker process(es) exited with an error "
                                    f"(exit codes {[p.exitcode for p in failed]})",
                                    hint="see the log above; `tuneline tune SPEC --resume` continues the search"))


def _worker(ctx_file: str, url: str, s: SearchSpec, index: int, threads: int, timeout: float | None) -> None:
    import optuna
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx: TrialContext = pickle.loads(Path(ctx_file).read_bytes())
    study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(url), sampler=make_sampler(s, offset=index),
                              pruner=make_pruner(s, max_validations(s, ctx.spec.train)))
    if _finished(study) < s.trials:
        study.optimize(objective(ctx), timeout=timeout, callbacks=[_Budget(s.trials)], catch=(Exception,),
                       gc_after_trial=True)


class _TrialPrinter:
    def __init__(self, console: Console, metric: str) -> None:
        self.console, self.metric = console, metric

    def __call__(self, study: Study, t: FrozenTrial) -> None:
        row = _row(t)
        params = ", ".join(f"{k}={_fmt_value(v)}" for k, v in row.params.items())
        value = f"{self.metric} {row.value:.4f}" if row.value is not None else (
            f"{self.metric} {row.validations[-1][1]:.4f} at validation {len(row.validations)}" if row.validations else "")
        secs = f", {row.seconds:.0f}s" if row.seconds is not None else ""
        self.console.print(f"trial {row.number}: {params} -> {row.state} {value}{secs}", highlight=False)


def _progress(enabled: bool, console: Console | None) -> QuietWhenPiped:
    return progress_bar(enabled=enabled, console=console)


def _fmt_value(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --- results ------------------------------------------------------------------------------------

def _row(t: FrozenTrial) -> TrialRow:
    state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
             "WAITING": "waiting"}[t.state.name]
    if state == "failed" and t.user_attrs.get("interrupted"):
        state = "interrupted"
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    return TrialRow(number=t.number, state=state, params=dict(t.params),
                    # Optuna stores a pruned trial's last report as its value: it is not a finished score
                    value=float(t.value) if t.value is not None and state == "complete" else None,
                    validations=sorted((int(k), float(v)) for k, v in t.intermediate_values.items()),
                    seconds=seconds if seconds is not None else t.user_attrs.get("seconds"),
                    retry_of=t.user_attrs.get("retry_of"), interrupted=bool(t.user_attrs.get("interrupted")),
                    mlflow_run_id=t.user_attrs.get("mlflow_run_id"), attempts=int(t.user_attrs.get("attempts", 1)))


def summarize(study: Study, s: SearchSpec, metric: str, direction: str, *, backend: str, spec: Spec,
              trained_on_all: bool, seconds: float) -> SearchResult:
    from optuna.trial import TrialState

    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = _row(study.best_trial) if complete else None
    importances: dict[str, float] = {}
    if len(complete) >= MIN_TRIALS_FOR_IMPORTANCE:
        import optuna

        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError) as e:  # e.g. every complete trial had the same values
            log.info("no parameter importances: %s", e)
    reusable = None
    if best is not None and trained_on_all:
        adapter = study.best_trial.user_attrs.get("adapter_dir")
        if adapter and (Path(adapter) / "adapter_config.json").is_file():
            reusable = adapter
    defaults = next((dict(t.params) for t in study.get_trials(deepcopy=False) if t.user_attrs.get("default")), {})
    return SearchResult(study_name=study.study_name, backend=backend, metric=metric, direction=direction,
                        trials_wanted=s.trials, trials=rows, best=best, importances=importances,
                        default_params=defaults, reusable_adapter=reusable,
                        parent_run_id=study.user_attrs.get("mlflow_parent_run_id"), seconds=seconds)


def _record(result: SearchResult, study_dir: Path, uri: str) -> None:
    """The summary beside the study and on the search's MLflow run (the report reads it there)."""
    from mlflow.tracking import MlflowClient

    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    if result.parent_run_id:
        client = MlflowClient(uri)
        client.log_dict(result.parent_run_id, result.to_dict(), "search/summary.json")
        if result.best is not None and result.best.value is not None and not math.isnan(result.best.value):
            client.log_metric(result.parent_run_id, f"search.best_{result.metric}", result.best.value)
        client.set_tag(result.parent_run_id, "tuneline.study", result.study_name)


def best_train(spec: Spec, result: SearchResult) -> TrainSpec:
    """The train section with the best trial's values applied."""
    return apply_params(spec.train, result.best_params)
