"""How a search samples and prunes: Optuna's TPE sampler (seeded) and the pruner the spec names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneline.spec.models import SearchSpec

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import TPESampler


def make_pruner(search: SearchSpec, train_max: int) -> BasePruner:
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


def make_sampler(search: SearchSpec, offset: int = 0) -> TPESampler:
    import optuna

    # TPE needs some random trials first; Optuna's default (10) would make a short search all random
    startup = max(2, min(10, search.trials // 3))
    return optuna.samplers.TPESampler(seed=search.seed + offset, n_startup_trials=startup, multivariate=True)
