"""Hyperparameter search: Optuna (TPE, pruning) locally or in worker processes, Ray Tune on a cluster."""

from tuneline.tune.space import apply_params
from tuneline.tune.study import (
    SearchOptions,
    SearchResult,
    TrialRow,
    best_train,
    search,
    study_name,
)

__all__ = ["SearchOptions", "SearchResult", "TrialRow", "apply_params", "best_train", "search", "study_name"]
