"""``task.head: classifier``: the spec field and its checks, and the classifier trainer on the tiny model
(trains, resumes exactly, learns a separable task, saves and loads back, answers a served request)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneline.data.examples import Example
from tuneline.data.tokenize import encode_prompt
from tuneline.errors import SpecError
from tuneline.eval.classify import classify_detailed, is_classifier
from tuneline.eval.generate import GenerateOptions
from tuneline.runtime import autocast_for
from tuneline.serve.classifier import (
    classify_prompt,
    is_classifier_version,
    load_classifier_version,
)
from tuneline.spec.loader import parse_spec
from tuneline.spec.models import TrainSpec
from tuneline.train import TrainOptions
from tuneline.train.classifier import CLASSIFIER_FILE, load_classifier, train_classifier

LABELS = ["alpha", "beta", "gamma"]

SPEC = """
name: heads
task:
  type: {task}
  head: classifier
objective: {{primary: {primary}}}
model: smollm2-135m
data:
  train: {{path: train.csv}}
train:
  method: {method}
"""


def _spec(task: str = "classification", method: str = "lora", primary: str = "accuracy") -> str:
    return SPEC.format(task=task, method=method, primary=primary)


def test_head_defaults_to_generate_and_leaves_the_serialized_spec_as_it_was():
    spec = parse_spec(_spec().replace("  head: classifier\n", ""))
    assert spec.task.head == "generate"
    assert "head" not in spec.task.model_dump(mode="json")  # fingerprints of existing specs do not move
    assert parse_spec(_spec()).task.model_dump(mode="json")["head"] == "classifier"


def test_classifier_head_on_a_generation_task_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(task="instruction", primary="rougeL"), "spec.yaml")
    text = str(err.value)
    assert "task" in text and "head 'classifier' applies only to task type 'classification'" in text


def test_classifier_head_with_a_method_it_cannot_train_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(method="ia3"), "spec.yaml")
    assert "train.method" in str(err.value) and "lora, dora, rslora" in str(err.value)
    with pytest.raises(SpecError, match="retrieval"):
        parse_spec(_spec() + "retrieval: {k: 2}\n", "spec.yaml")


def _rows(n_per_label: int, offset: int = 0) -> list[Example]:
    """A separable task even for a tiny random model: the label word, six times, is the message."""
    out = []
    for i in range(n_per_label):
        for label in LABELS:
            text = f"{(label + ' ') * 6}number {i + offset}"
            out.append(Example(f"r{i + offset}-{label}", (
                {"role": "system", "content": "Classify the message."}, {"role": "user", "content": text},
                {"role": "assistant", "content": label}), label, label))
    return out


def _base(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


CFG = TrainSpec(lr=1e-2, max_steps=30, batch_size=8, seq_len=96, checkpoint_every=10, precision="fp32",
                warmup_ratio=0.0)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("head")
    model, result = train_classifier(CFG, _base(tiny_model_dir), tokenizer, _rows(8), out,
                                     TrainOptions(fingerprint="fp", show_progress=False, eval_examples=_rows(2, 50)),
                                     labels=LABELS)
    return model, result, out


def test_classifier_learns_a_separable_task_and_answers_in_one_forward(trained, tokenizer):
    model, result, _ = trained
    assert is_classifier(model) and result.steps == CFG.max_steps and result.eval_loss is not None
    test = _rows(4, offset=100)  # unseen messages
    gen = classify_detailed(model, tokenizer, test, GenerateOptions(batch_size=5, autocast=autocast_for("fp32", "cpu"),
                                                                    show_progress=False))
    accuracy = sum(a == ex.reference for a, ex in zip(gen.texts, test, strict=True)) / len(test)
    assert accuracy >= 0.75, gen.texts  # chance is 1/3
    assert set(gen.texts) <= set(LABELS) and all(gen.stopped) and gen.tokens == [0] * len(test)


def test_saved_classifier_loads_back_with_the_same_answers(trained, tokenizer, tiny_model_dir: Path):
    model, result, _ = trained
    folder = Path(result.adapter_dir)
    assert (folder / CLASSIFIER_FILE).is_file() and (folder / "adapter_model.safetensors").is_file()
    assert is_classifier_version(folder)
    loaded = load_classifier(_base(tiny_model_dir), folder)
    test = _rows(2, offset=200)
    opts = GenerateOptions(batch_size=4, autocast=autocast_for("fp32", "cpu"), show_progress=False)
    assert classify_detailed(loaded, tokenizer, test, opts).texts == classify_detailed(model, tokenizer, test, opts).texts


def test_served_request_is_answered_with_the_label(trained, tokenizer, tiny_model_dir: Path):
    _, result, _ = trained
    base = _base(tiny_model_dir)
    before = {n: p.clone() for n, p in base.named_parameters()}
    served = load_classifier_version(base, result.adapter_dir)
    ex = _rows(1, offset=300)[1]  # beta
    label = classify_prompt(served, tokenizer, encode_prompt(tokenizer, ex))
    assert label == ex.reference
    # the engine's base model is left as it was (the classifier got a copy)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


class _Crash(Exception):
    pass


def test_resumed_classifier_equals_uninterrupted(trained, tiny_model_dir: Path, tokenizer, tmp_path: Path):
    cfg = CFG.model_copy(update={"max_steps": 6, "checkpoint_every": 2})
    rows = _rows(8)
    full, whole = train_classifier(cfg, _base(tiny_model_dir), tokenizer, rows, tmp_path / "a",
                                   TrainOptions(fingerprint="fp", show_progress=False), labels=LABELS)

    def crash_at_5(step: int, metrics: dict) -> None:
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train_classifier(cfg, _base(tiny_model_dir), tokenizer, rows, tmp_path / "b",
                         TrainOptions(fingerprint="fp", on_step=crash_at_5, show_progress=False), labels=LABELS)
    resumed, result = train_classifier(cfg, _base(tiny_model_dir), tokenizer, rows, tmp_path / "b",
                                       TrainOptions(fingerprint="fp", resume=True, show_progress=False), labels=LABELS)
    assert result.resumed_from_step == 4
    # the whole run's tokens and time, the crashed process's 4 steps included (not only the last 2)
    assert result.train_tokens == whole.train_tokens and result.computed_tokens == whole.computed_tokens
    before = json.loads((tmp_path / "b" / "checkpoints" / "step-0000004" / "meta.json").read_text())
    assert 0 < before["spent_seconds"] < result.seconds and 0 < before["spent_tokens"] < result.train_tokens
    a = {n: p for n, p in full.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and any("score" in n for n in a)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=f"{n} differs after resume")


def test_served_batch_gives_each_prompt_its_own_label(trained, tokenizer):
    from tuneline.serve.classifier import classify_prompts

    model, _, _ = trained
    rows = _rows(2, offset=400)  # alpha, beta, gamma, alpha, beta, gamma; lengths differ: padding in the batch
    labels = classify_prompts(model, tokenizer, [encode_prompt(tokenizer, ex) for ex in rows])
    assert labels == [classify_prompt(model, tokenizer, encode_prompt(tokenizer, ex)) for ex in rows]
    assert labels == [ex.reference for ex in rows]


def test_the_engine_answers_a_classifier_version_with_its_label(trained, tokenizer, tiny_model_dir: Path):
    """Registered like any adapter, a classifier version gets a model of its own in the server; each
    request's answer is the label one forward pass gives, nothing generated, as evaluation answers."""
    from tuneline.serve import Engine, Job
    from tuneline.serve.classifier import classify_prompts

    _, result, _ = trained
    rows = _rows(2, offset=400)
    prompts = [encode_prompt(tokenizer, ex) for ex in rows]
    expected = classify_prompts(load_classifier(_base(tiny_model_dir), result.adapter_dir), tokenizer, prompts)
    engine = Engine(_base(tiny_model_dir), tokenizer, max_batch=8, window_s=0.1)
    try:
        slot = engine.adapter_for("head@1", str(result.adapter_dir))
        assert engine.per_model[slot].kind == "classifier"
        answers = [f.result(timeout=120) for f in [engine.submit(Job(p, slot, 8)) for p in prompts]]
    finally:
        engine.close()
    assert [a.text for a in answers] == expected and set(expected) <= set(LABELS)
    assert all(a.finish_reason == "stop" and a.completion_tokens == 0 for a in answers)
