"""The search space: Optuna distributions from the spec, and a trial's values applied to ``train``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tuneline.spec.models import ParamSpace, SearchSpec, Spec, TrainSpec, set_path

if TYPE_CHECKING:
    from optuna import Trial
    from optuna.distributions import BaseDistribution

# a searched parameter's value: what ParamSpace.choices may hold; None only because Optuna's categorical
# values include it (a spec's choices never do)
ParamValue = str | bool | int | float | None


def distribution(space: ParamSpace) -> BaseDistribution:
    """The Optuna distribution of one searched parameter."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if space.type == "categorical":
        return CategoricalDistribution(list(space.choices or []))
    low, high = float(space.low or 0), float(space.high or 0)
    if space.type == "int":
        return IntDistribution(int(low), int(high), log=space.log, step=int(space.step or 1))
    if space.type == "loguniform":
        return FloatDistribution(low, high, log=True)
    return FloatDistribution(low, high, step=space.step)


def distributions(search: SearchSpec) -> dict[str, BaseDistribution]:
    return {path: distribution(space) for path, space in search.space.items()}


def suggest(trial: Trial, search: SearchSpec) -> dict[str, ParamValue]:
    """Ask an Optuna trial for a value of every searched parameter."""
    out: dict[str, ParamValue] = {}
    for path, space in search.space.items():
        if space.type == "categorical":
            out[path] = trial.suggest_categorical(path, list(space.choices or []))
        elif space.type == "int":
            out[path] = trial.suggest_int(path, int(space.low or 0), int(space.high or 0),
                                          step=int(space.step or 1), log=space.log)
        else:
            out[path] = trial.suggest_float(path, float(space.low or 0), float(space.high or 0),
                                            step=space.step, log=space.type == "loguniform")
    return out


def apply_params(train: TrainSpec, params: Mapping[str, ParamValue]) -> TrainSpec:
    """``train`` with each searched value set at its path (``lr``, ``lora.r``, ...), validated."""
    data: dict[str, object] = train.model_dump()
    for path, value in params.items():
        data = set_path(data, path, value)
    return TrainSpec.model_validate(data)


def max_validations(search: SearchSpec, train: TrainSpec) -> int:
    """An upper bound on the validations a trial reports (the resource of ASHA/Hyperband)."""
    epochs = train.epochs
    if "epochs" in search.space and search.space["epochs"].type != "categorical":
        epochs = float(search.space["epochs"].high or epochs)
    elif "epochs" in search.space:
        epochs = max(float(c) for c in search.space["epochs"].choices or [epochs])
    return max(1, int(epochs / search.eval_every + 0.999) + 1)


def default_params(spec: Spec) -> dict[str, ParamValue]:
    """The spec's own train values for the searched parameters, where the space contains them."""
    assert spec.search is not None
    train = spec.train.model_dump()
    out: dict[str, ParamValue] = {}
    for path in spec.search.space:
        value: Any = train  # walks train.model_dump(): nested dicts down to the value
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
