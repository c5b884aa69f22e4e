"""The search: an Optuna study (TPE sampling, pruning) in the workspace, resumable, each trial an
MLflow child run of the search run; trials in this process, in worker processes, or on Ray.

The study lives in ``<workspace>/studies.db`` (SQLite), beside the MLflow store ``mlflow.db``
rather than inside it: Optuna and MLflow each keep their schema revision in a table named
``alembic_version``, so one file cannot hold both (each refuses the other's revision). The study
is found by its name, a hash of what the trials' results depend on (search and train sections,
task, dataset version, base model), so the same spec on the same data continues the same study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.errors import Problem, TrainingError
from tuneline.runtime.progress import QuietWhenPiped, progress_bar
from tuneline.spec.loader import LoadedSpec
from tuneline.spec.models import SearchSpec, Spec
from tuneline.tune.space import apply_params, distributions, max_validations, suggest
from tuneline.tune.trial import TrialContext, TrialPruned, run_trial
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

# fANOVA on fewer complete trials than this ranks parameters by noise
MIN_TRIALS_FOR_IMPORTANCE = 4


@dataclass
class TrialRow:
    number: int
    state: str  # complete, pruned, failed, running, waiting
    params: dict[str, Any]
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
    default_params: dict[str, Any] = field(default_factory=dict)
    reusable_adapter: str | None = None
    parent_run_id: str | None = None
    seconds: float = 0.0

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.best.params) if self.best else {}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
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
    payload = json.dumps({"search": search, "train": spec.train.model_dump(mode="json"),
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


def storage_url(ws: Workspace) -> str:
    return f"sqlite:///{ws.root / 'studies.db'}"


def make_pruner(search: SearchSpec, train_max: int) -> Any:
    import optuna

    p = search.pruner
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=train_max,
                                              reduction_factor=p.reduction_factor)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_resource - 1)
    return optuna.pruners.NopPruner()


def make_sampler(search: SearchSpec, offset: int = 0) -> Any:
    import optuna

    # TPE needs some random trials first; Optuna's default (10) would make a short search all random
    startup = max(2, min(10, search.trials // 3))
    return optuna.samplers.TPESampler(seed=search.seed + offset, n_startup_trials=startup, multivariate=True)


def default_params(spec: Spec) -> dict[str, Any]:
    """The spec's own train values for the searched parameters, where the space contains them."""
    assert spec.search is not None
    train = spec.train.model_dump()
    out: dict[str, Any] = {}
    for path in spec.search.space:
        value: Any = train
        for part in path.split("."):
            value = value[part]
        if path == "lora.target_modules" and isinstance(value, list):
            value = ",".join(value)
        dist = distributions(spec.search)[path]
        try:
            inside = dist._contains(dist.to_internal_repr(value))
        except (ValueError, TypeError):
            inside = False
        if not inside:
            return {}
        out[path] = value
    return out


# --- running ------------------------------------------------------------------------------------

def search(
    loaded: LoadedSpec,
    ws: Workspace,
    *,
    data: Any,
    version: Any,
    tokenizer: Any,
    source: Any,
    device: str,
    precision: str,
    dtype: str,
    resume: bool = False,
    restart: bool = False,
    workers: int | None = None,
    trials: int | None = None,
    parent_run_id: str | None = None,
    console: Any = None,
    show_progress: bool = True,
) -> SearchResult:
    """Run (or continue, or reuse when finished) the spec's hyperparameter search."""
    import optuna
    from rich.console import Console

    from tuneline import tracking

    console = console or Console()
    spec = loaded.spec
    if spec.search is None:
        raise TrainingError(Problem("the spec has no `search` section", field="search",
                                    hint="add search: {space: {lr: {type: loguniform, low: 1e-4, high: 3e-3}}, trials: 8}"))
    s = spec.search if trials is None else spec.search.model_copy(update={"trials": trials})
    metric = s.metric or spec.objective.primary
    direction = s.resolved_direction(metric)
    name = study_name(loaded, version.id if version is not None else None, source.fingerprint())
    study_dir = ws.root / "studies" / name
    url = storage_url(ws)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    t0 = time.perf_counter()

    exists = name in optuna.study.get_all_study_names(storage)
    ray_dir = study_dir / "ray"
    if restart:
        if exists:
            optuna.delete_study(study_name=name, storage=storage)
        shutil.rmtree(study_dir, ignore_errors=True)
        exists = False
    if exists:
        study = optuna.load_study(study_name=name, storage=storage)
        done = _finished(study)
        if done >= s.trials:
            _close_interrupted(study, tracking.tracking_uri(loaded, ws), retry=False)
            console.print(f"search {name}: {done} of {s.trials} trials already finished; reusing it "
                          "(`tuneline tune --restart` runs a new one)")
            return summarize(study, s, metric, direction, backend=_backend_of(study), spec=spec,
                             trained_on_all=bool(study.user_attrs.get("trained_on_all")), seconds=0.0)
        if not resume:
            raise TrainingError(Problem(
                f"a search for this spec stopped after {done} of {s.trials} trials (study {name})",
                hint="continue it with `tuneline tune SPEC --resume` (or `tuneline run SPEC --resume`); "
                     "start over with `tuneline tune SPEC --restart`"))
    elif s.backend == "ray" and ray_dir.exists() and not resume:
        raise TrainingError(Problem(
            f"a Ray search for this spec was interrupted (study {name}, {ray_dir})",
            hint="continue it with `tuneline tune SPEC --resume`; start over with `--restart`"))

    # the parent run: this command's (tuneline run) or one of its own, kept across resumes
    uri = tracking.tracking_uri(loaded, ws)
    train_rows = data.train
    if s.train_rows and s.train_rows < len(train_rows):
        from tuneline.eval.validate import sample_rows

        train_rows = sample_rows(train_rows, s.train_rows, s.seed)
    trained_on_all = len(train_rows) == len(data.train)
    if s.backend == "ray":
        from tuneline.tune.ray_backend import run_ray

        parent = parent_run_id or _new_parent_run(loaded, ws, name)
        ctx = _context(loaded, ws, data, tokenizer, source, device, precision, dtype, name, study_dir,
                       parent, metric, direction, train_rows, trained_on_all)
        study = run_ray(ctx, s, storage, resume=resume and ray_dir.exists(), console=console)
        study.set_user_attr("mlflow_parent_run_id", parent)
        study.set_user_attr("trained_on_all", trained_on_all)
        study.set_user_attr("backend", "ray")
    else:
        if not exists:
            study = optuna.create_study(study_name=name, storage=storage,
                                        direction="maximize" if direction == "maximize" else "minimize")
            study.set_user_attr("trained_on_all", trained_on_all)
            study.set_user_attr("backend", "local")
            study.set_user_attr("spec", spec.name)
            if (defaults := default_params(spec)):
                study.enqueue_trial(defaults, user_attrs={"default": True})  # the hand-set values, as trial 0
        else:
            console.print(f"search {name}: resuming after {_finished(study)} finished trials")
            _close_interrupted(study, uri, retry=True)
        parent = parent_run_id or study.user_attrs.get("mlflow_parent_run_id") or _new_parent_run(loaded, ws, name)
        study.set_user_attr("mlflow_parent_run_id", parent)
        ctx = _context(loaded, ws, data, tokenizer, source, device, precision, dtype, name, study_dir,
                       parent, metric, direction, train_rows, trained_on_all)
        n_workers = workers or s.workers
        _optimize_local(ctx, s, url, n_workers, console, show_progress)
        study = optuna.load_study(study_name=name, storage=storage)
    result = summarize(study, s, metric, direction, backend=s.backend, spec=spec, trained_on_all=trained_on_all,
                       seconds=time.perf_counter() - t0)
    _record(result, study_dir, uri)
    return result


def _finished(study: Any) -> int:
    """Trials that count toward the budget: complete, pruned, or failed by themselves (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))


def _backend_of(study: Any) -> str:
    return str(study.user_attrs.get("backend", "local"))


def _close_interrupted(study: Any, uri: str, *, retry: bool) -> None:
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

    from tuneline import tracking

    with tracking.start_run(loaded, ws, run_name="search") as run:
        mlflow.set_tags({"tuneline.kind": "search", "tuneline.study": name})
        mlflow.log_dict(loaded.spec.model_dump(mode="json")["search"], "search/space.json")
        run_id: str = run.info.run_id
    return run_id


def _context(loaded: LoadedSpec, ws: Workspace, data: Any, tokenizer: Any, source: Any, device: str, precision: str,
             dtype: str, name: str, study_dir: Path, parent: str, metric: str, direction: str,
             train_rows: list[Any], trained_on_all: bool) -> TrialContext:
    from mlflow.tracking import MlflowClient

    from tuneline import tracking
    from tuneline.eval.validate import sample_rows
    from tuneline.train.loop import encode_all

    spec = loaded.spec
    assert spec.search is not None
    uri = tracking.tracking_uri(loaded, ws)
    experiment_id = MlflowClient(uri).get_run(parent).info.experiment_id
    study_dir.mkdir(parents=True, exist_ok=True)
    if not data.eval:
        raise TrainingError(Problem(
            "a search scores trials on the validation split, and this spec has none",
            field="data.eval", hint="add data.eval, or set curation.split.validation above 0 (never search on the test set)"))
    return TrialContext(
        spec=spec, source=source, models_dir=ws.models_dir, tokenizer=tokenizer, train=train_rows,
        encoded=encode_all(tokenizer, train_rows, spec.train.seq_len),  # once, for every trial
        validation=sample_rows(data.eval, spec.search.eval_rows, spec.search.seed), labels=data.labels,
        metric=metric, maximize=direction == "maximize", device=device, precision=precision, dtype=dtype,
        study_name=name, study_dir=study_dir, tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent,
        trained_on_all=trained_on_all)


def objective(ctx: TrialContext) -> Any:
    """The Optuna objective: one trial's training, reporting each validation to the pruner."""
    import optuna

    assert ctx.spec.search is not None
    space = ctx.spec.search

    def run(trial: Any) -> float:
        params = suggest(trial, space)

        def report(index: int, value: float, last: bool) -> None:
            trial.report(value, index)
            if not last and trial.should_prune():
                raise TrialPruned()

        trial.set_user_attr("started", time.time())
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

    def __call__(self, study: Any, _trial: Any) -> None:
        if _finished(study) >= self.trials:
            study.stop()


def _optimize_local(ctx: TrialContext, s: SearchSpec, url: str, workers: int, console: Any, show_progress: bool) -> None:
    import optuna

    train_max = max_validations(s, ctx.spec.train)
    timeout = s.timeout_minutes * 60 if s.timeout_minutes else None
    if workers <= 1:
        study = optuna.load_study(study_name=ctx.study_name, storage=url, sampler=make_sampler(s),
                                  pruner=make_pruner(s, train_max))
        remaining = s.trials - _finished(study)
        printer = _TrialPrinter(console, ctx.metric)
        with _progress(show_progress, console) as bar:
            task = bar.add_task("search", total=s.trials, completed=_finished(study))

            def shown(st: Any, tr: Any) -> None:
                printer(st, tr)
                bar.update(task, completed=min(s.trials, _finished(st)))

            if remaining > 0:
                study.optimize(objective(ctx), timeout=timeout, callbacks=[_Budget(s.trials), shown],
                               catch=(Exception,), gc_after_trial=True)
        return
    import multiprocessing as mp
    import os

    ctx_file = ctx.study_dir / "context.pkl"
    ctx_file.write_bytes(pickle.dumps(ctx))  # prepared once; every worker reads the same tokenized data
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [mp.get_context("spawn").Process(target=_worker, args=(str(ctx_file), url, s, i, threads, timeout),
                                             name=f"tuneline-trial-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    study = optuna.load_study(study_name=ctx.study_name, storage=url)
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
    study = optuna.load_study(study_name=ctx.study_name, storage=url, sampler=make_sampler(s, offset=index),
                              pruner=make_pruner(s, max_validations(s, ctx.spec.train)))
    if _finished(study) < s.trials:
        study.optimize(objective(ctx), timeout=timeout, callbacks=[_Budget(s.trials)], catch=(Exception,),
                       gc_after_trial=True)


class _TrialPrinter:
    def __init__(self, console: Any, metric: str) -> None:
        self.console, self.metric = console, metric

    def __call__(self, study: Any, t: Any) -> None:
        row = _row(t)
        params = ", ".join(f"{k}={_fmt_value(v)}" for k, v in row.params.items())
        value = f"{self.metric} {row.value:.4f}" if row.value is not None else (
            f"{self.metric} {row.validations[-1][1]:.4f} at validation {len(row.validations)}" if row.validations else "")
        secs = f", {row.seconds:.0f}s" if row.seconds is not None else ""
        self.console.print(f"trial {row.number}: {params} -> {row.state} {value}{secs}", highlight=False)


def _progress(enabled: bool, console: Console | None) -> QuietWhenPiped:
    return progress_bar(enabled=enabled, console=console)


def _fmt_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --- results ------------------------------------------------------------------------------------

def _row(t: Any) -> TrialRow:
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


def summarize(study: Any, s: SearchSpec, metric: str, direction: str, *, backend: str, spec: Spec,
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


def best_train(spec: Spec, result: SearchResult) -> Any:
    """The train section with the best trial's values applied."""
    return apply_params(spec.train, result.best_params)
