"""The spec's search and early-stopping sections: every bad value named before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import spec_error


@pytest.mark.parametrize("space,match", [
    ("{learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}", "train has no parameter 'learning_rate'"),
    ("{lora.rank: {type: int, low: 4, high: 8}}", "train has no parameter 'lora.rank'"),
    ("{lr: {type: loguniform, low: 0, high: 1.0e-2}}", "a log scale needs low > 0"),
    ("{lr: {type: uniform, low: 0.1, high: 0.01}}", "must be below high"),
    ("{batch_size: {type: categorical}}", "needs a non-empty `choices`"),
    ("{batch_size: {type: categorical, choices: [0, 16]}}", "the value 0 is not valid for train.batch_size"),
    ("{lora.dropout: {type: uniform, low: 0.0, high: 1.5}}", "the value 1.5 is not valid for train.lora.dropout"),
    ("{checkpoint_every: {type: int, low: 1, high: 9}}", "not a parameter a search may vary"),
])
def test_search_space_errors_name_the_parameter(tmp_path: Path, space: str, match: str):
    assert match in spec_error(tmp_path, f"search: {{space: {space}}}")


def test_search_metric_must_be_measured_on_validation(tmp_path: Path):
    message = spec_error(tmp_path, "search: {metric: rouge_l, space: {lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}}")
    assert "search.metric: 'rouge_l' is not measured for task 'classification'" in message


def test_early_stopping_metric_is_checked_when_the_spec_loads(tmp_path: Path):
    message = spec_error(tmp_path, "train: {early_stopping: {metric: bleu}}")
    assert "train.early_stopping.metric: 'bleu' is not measured for task 'classification'" in message


def test_apply_params_sets_nested_values_and_module_lists():
    from tuneline.spec.models import TrainSpec
    from tuneline.tune import apply_params

    cfg = apply_params(TrainSpec(), {"lr": 2e-3, "lora.r": 32, "lora.target_modules": "q_proj, v_proj",
                                     "batch_size": 32})
    assert (cfg.lr, cfg.lora.r, cfg.lora.target_modules, cfg.batch_size) == (2e-3, 32, ["q_proj", "v_proj"], 32)
    assert cfg.lora.alpha == TrainSpec().lora.alpha  # untouched values stay
