"""Validation during training: early stopping on a plateau, the best weights kept, pipeline wiring."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline.curation import prepare
from tuneline.spec import load_spec
from tuneline.train.loop import EarlyStoppingCheck, TrainOptions, train


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _setup(classification_spec: Path, tiny_model_dir: Path):
    loaded = load_spec(classification_spec)
    cfg = loaded.spec.train.model_copy(update={"method": "lora", "max_steps": 12, "checkpoint_every": 5})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return cfg, model, AutoTokenizer.from_pretrained(tiny_model_dir), prepare(loaded).train


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_weights(classification_spec: Path,
                                                                      tiny_model_dir: Path, tmp_path: Path):
    cfg, model, tok, rows = _setup(classification_spec, tiny_model_dir)
    scores = iter([0.40, 0.60, 0.55, 0.58, 0.90, 0.95])  # best at the 2nd validation, then 2 without a gain
    seen: list[dict[str, torch.Tensor]] = []

    def score(m) -> float:
        seen.append(_trainable(m))
        return next(scores)

    reported: list[tuple[int, float]] = []
    check = EarlyStoppingCheck(every=2, score=score, maximize=True, patience=2, min_delta=0.0, keep_best=True,
                            report=lambda i, v: reported.append((i, v)))
    trained, result = train(cfg, model, tok, rows, tmp_path / "run", TrainOptions(early_stopping=check, show_progress=False))
    assert result.stopped_early
    assert result.steps == 8  # validations at steps 2, 4, 6, 8; stopped after the 4th
    assert result.validations == [(2, 0.40), (4, 0.60), (6, 0.55), (8, 0.58)]
    assert reported == [(1, 0.40), (2, 0.60), (3, 0.55), (4, 0.58)]
    assert (result.best_step, result.best_value) == (4, 0.60)
    final = _trainable(trained)
    for name, value in seen[1].items():  # the weights the best validation scored, not the last ones
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)
    assert any(not torch.equal(final[n], seen[3][n]) for n in final)
    # the saved adapter is the best one
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                         result.adapter_dir)
    for name, value in _trainable_names(reloaded).items():
        torch.testing.assert_close(value, seen[1][name], rtol=0, atol=0)


def _trainable_names(model) -> dict[str, torch.Tensor]:
    # a reloaded adapter is frozen: compare by the adapter parameters' names
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_minimizing_with_min_delta_and_no_patience_runs_to_the_end(classification_spec: Path, tiny_model_dir: Path,
                                                                   tmp_path: Path):
    cfg, model, tok, rows = _setup(classification_spec, tiny_model_dir)
    values = iter([5.0, 4.95, 4.0, 4.5, 4.2, 4.1])
    check = EarlyStoppingCheck(every=2, score=lambda m: next(values), maximize=False, min_delta=0.1, keep_best=True)
    _, result = train(cfg, model, tok, rows, tmp_path / "run", TrainOptions(early_stopping=check, show_progress=False))
    assert not result.stopped_early and result.steps == 12
    assert (result.best_step, result.best_value) == (6, 4.0)  # 4.95 is not 0.1 better than 5.0


def test_run_with_early_stopping_validates_on_the_validation_split(tmp_path: Path, tiny_model_dir: Path):
    from helpers import banking_rows, write_csv, write_spec
    from rich.console import Console

    import tuneline

    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    write_csv(tmp_path / "train.csv", banking_rows(labels, 12))
    spec = write_spec(tmp_path, f"""
        name: tiny-es
        task: {{type: classification, instruction: Classify the message.}}
        objective: {{primary: accuracy}}
        model: {tiny_model_dir}
        data: {{train: {{path: train.csv, columns: {{label: category}}}}}}
        curation: {{split: {{validation: 0.25, test: 0.25}}}}
        train:
          lr: 1.0e-5
          epochs: 6
          batch_size: 8
          seq_len: 96
          precision: fp32
          early_stopping: {{metric: eval_loss, every: 1, patience: 1, min_delta: 0.5}}
        eval: {{batch_size: 16, forgetting: false, robustness: {{enabled: false}}, latency: {{enabled: false}}}}
    """)
    result = tuneline.run(spec, workspace=tmp_path / "ws", show_progress=False, console=Console(width=200))
    # lr 1e-5 cannot move the loss by 0.5 in one epoch: the second validation ends the run
    assert result.train.stopped_early
    assert len(result.train.validations) == 2 and result.train.best_step == result.train.validations[0][0]
    assert result.train.steps < 6 * 3
