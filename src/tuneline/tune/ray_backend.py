"""The search on a Ray cluster: Ray Tune runs the trials (Optuna's TPE as the search algorithm,
ASHA scheduling on the validation reports, a resource request per trial, retries of a trial whose
worker died), and the finished trials are then written to the workspace's Optuna study, so the
table, importances, plots and reuse are the same as for a local search.

The trial context (tokenized data, validation rows) goes to the cluster once, through Ray's object
store (``tune.with_parameters``). On a multi-machine cluster the workspace (trial folders, the
MLflow store) must be on storage every node sees, or ``tracking.uri`` must name an MLflow server.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from tuneline.errors import Problem, TrainingError
from tuneline.runtime.raycluster import connect
from tuneline.spec.models import SearchSpec
from tuneline.tune.sampling import make_sampler
from tuneline.tune.space import ParamValue, default_params, distributions, max_validations
from tuneline.tune.trial import TrialContext, run_trial, trial_dir

if TYPE_CHECKING:
    from optuna import Study
    from optuna.storages import BaseStorage
    from ray.tune import ResultGrid
    from rich.console import Console

log = logging.getLogger(__name__)

METRIC = "score"


def _trainable(config: dict[str, ParamValue], ctx: TrialContext | None = None, threads: int = 1) -> None:
    """One Ray Tune trial (runs in a Ray worker process)."""
    import torch
    from ray import tune

    assert ctx is not None and ctx.spec.search is not None
    torch.set_num_threads(threads)
    key = tune.get_context().get_trial_id()
    params = {k: config[k] for k in ctx.spec.search.space}

    def report(index: int, value: float, last: bool) -> None:
        tune.report({METRIC: value, "validation": index, "final": bool(last)})

    run_trial(ctx, key, params, report)


def run_ray(ctx: TrialContext, s: SearchSpec, storage: BaseStorage, *, resume: bool, console: Console) -> Study:
    """Run the search through Ray Tune; return the workspace's Optuna study holding its trials."""
    try:
        from ray import tune
    except ImportError as e:
        raise TrainingError(Problem("search.backend is ray, and Ray is not installed", field="search.backend",
                                    hint="pip install 'tuneline[ray]' (Ray Tune), or set backend: local")) from e
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    mode = "max" if ctx.maximize else "min"
    connect(s.ray.address, "search.ray.address")  # the run's training (train.backend: ray) joins it too
    threads = max(1, int(s.ray.cpus_per_trial))
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx, threads=threads),
                                    {"cpu": s.ray.cpus_per_trial, "gpu": s.ray.gpus_per_trial})
    ray_dir = ctx.study_dir / "ray"
    if resume and tune.Tuner.can_restore(str(ray_dir)):
        console.print(f"search {ctx.study_name}: resuming the Ray experiment in {ray_dir}")
        tuner = tune.Tuner.restore(str(ray_dir), trainable=trainable, resume_errored=True)
    else:
        defaults = default_params(ctx.spec)
        searcher = OptunaSearch(space=distributions(s), metric=METRIC, mode=mode, sampler=make_sampler(s),
                                points_to_evaluate=[defaults] if defaults else None)
        scheduler = ASHAScheduler(metric=METRIC, mode=mode, time_attr="training_iteration", max_t=max_validations(s, ctx.spec.train),
                                  grace_period=s.pruner.min_resource, reduction_factor=s.pruner.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=s.trials,
                                        time_budget_s=s.timeout_minutes * 60 if s.timeout_minutes else None),
            run_config=tune.RunConfig(name="ray", storage_path=str(ctx.study_dir),
                                      failure_config=tune.FailureConfig(max_failures=s.ray.max_failures),
                                      verbose=0),
        )
    results = tuner.fit()
    return _mirror(ctx, s, storage, results)


def _mirror(ctx: TrialContext, s: SearchSpec, storage: BaseStorage, results: ResultGrid) -> Study:
    """Write Ray's trials into the Optuna study of this search (replacing an older copy)."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    if ctx.study_name in optuna.study.get_all_study_names(storage):
        optuna.delete_study(study_name=ctx.study_name, storage=storage)
    study = optuna.create_study(study_name=ctx.study_name, storage=storage,
                                direction="maximize" if ctx.maximize else "minimize")
    client = MlflowClient(ctx.tracking_uri)
    runs = client.search_runs([ctx.experiment_id], f"tags.`tuneline.study` = '{ctx.study_name}'", max_results=5000)
    dists = distributions(s)
    defaults = default_params(ctx.spec)
    # a ResultGrid is indexed, not iterable to the type checker (iterating it goes through __getitem__)
    entries = sorted((results[i] for i in range(len(results))), key=lambda r: str(r.metrics.get("trial_id", "") if r.metrics else ""))
    for r in entries:
        tid = (r.metrics or {}).get("trial_id") or os.path.basename(r.path or "")
        attempts = [x for x in runs if x.data.tags.get("tuneline.trial") == tid]
        for stale in attempts:  # an attempt whose worker was killed never ended its run
            if stale.info.status == "RUNNING":
                client.set_tag(stale.info.run_id, "tuneline.trial_state", "interrupted")
                client.set_terminated(stale.info.run_id, "FAILED")
        config = r.config or {}  # Ray types it optional; a finished trial's result always has its config
        params = {k: config[k] for k in dists if k in config}
        df = r.metrics_dataframe
        inter = ({int(v): float(x) for v, x in zip(df["validation"], df[METRIC], strict=False)}
                 if df is not None and METRIC in df else {})
        last = r.metrics or {}
        if r.error is not None or not inter:
            state, value = TrialState.FAIL, None
        elif last.get("final"):
            state, value = TrialState.COMPLETE, float(last[METRIC])
        else:
            state, value = TrialState.PRUNED, None
        finished = [x for x in attempts if x.data.tags.get("tuneline.trial_state") == "complete"]
        attrs = {"ray_trial_id": tid, "attempts": max(1, len(attempts)), "seconds": last.get("time_total_s"),
                 "adapter_dir": str(trial_dir(ctx, tid) / "adapter"),
                 "mlflow_run_id": (finished or attempts)[-1].info.run_id if attempts else None}
        if r.error is not None:
            attrs["error"] = str(r.error)[:2000]
        if defaults and params == defaults:
            attrs["default"] = True
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                  intermediate_values=inter, state=state, user_attrs=attrs))
    return study
