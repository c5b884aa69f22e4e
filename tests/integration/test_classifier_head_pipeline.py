"""``tuneline run`` with ``task.head: classifier`` on the tiny model: trains the head, scores it beside the
generative base (same metrics, intervals, gates, latency), registers it, `tuneline eval` loads it back, and
the registered adapter answers a chat request with a label."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_csv, write_spec

import tuneline
from tuneline.data.tokenize import render
from tuneline.serve.classifier import (
    classify_prompt,
    is_classifier_version,
    load_classifier_version,
)
from tuneline.workspace import Workspace

LABELS = ["alpha", "beta", "gamma"]


def _rows(n_per_label: int, offset: int = 0) -> list[dict[str, str]]:
    """A separable task even for a tiny random model: the label word, six times, is the message."""
    return [{"text": f"{(label + ' ') * 6}number {i + offset}", "category": label}
            for i in range(n_per_label) for label in LABELS]


@pytest.mark.slow  # ~30 s on this loaded 2-core CPU: the whole run (train, base and candidate scoring, register, eval)
def test_classifier_head_runs_evaluates_registers_and_serves(tmp_path: Path, tiny_model_dir: Path, tokenizer):
    from transformers import AutoModelForCausalLM

    write_csv(tmp_path / "train.csv", _rows(10))
    write_csv(tmp_path / "test.csv", _rows(4, offset=100))
    spec = write_spec(tmp_path, f"""
        name: tiny-head
        task:
          type: classification
          head: classifier
          instruction: Classify the message.
        objective:
          primary: accuracy
          thresholds: ["accuracy >= 0.6", "p95_latency_ms <= 60000"]
        model: {tiny_model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
        curation: {{dedup: {{near: false}}, split: {{validation: 0.0, test: 0.0}}}}
        train:
          method: lora
          lr: 1.0e-2
          max_steps: 30
          batch_size: 8
          seq_len: 96
          warmup_ratio: 0.0
          checkpoint_every: 10
          precision: fp32
        eval:
          batch_size: 16
          forgetting: false
          robustness: {{enabled: false}}
          latency: {{requests: 4}}
        baseline: {{enabled: false}}
        decoding: {{max_new_tokens: 8}}
    """)
    ws = Workspace.at(tmp_path / "ws")
    result = tuneline.run(spec, workspace=ws, show_progress=False)

    report = result.report
    assert report is not None and result.model_version == 1
    main = report.main_set()
    tuned, base = main.system("candidate"), main.system("base")
    assert tuned is not None and base is not None  # the base is the generative model, scored as before
    # the head learned the separable task (chance: 1/3), and its answers are labels, each a single forward
    assert tuned.metrics["accuracy"].value >= 0.75, tuned.predictions
    acc = tuned.metrics["accuracy"]
    assert acc.low is not None and acc.high is not None and acc.low <= acc.value <= acc.high
    assert set(tuned.predictions) <= set(LABELS)
    assert any(c.metric == "accuracy" and c.test == "mcnemar" for c in main.comparisons)
    assert report.latency is not None and report.latency.n == 4
    assert report.forgetting is None and report.passed

    # the registered adapter is a classifier; `tuneline eval` scores it the same way
    adapter = Path(result.train.adapter_dir)
    assert is_classifier_version(adapter)
    again = tuneline.evaluate(spec, workspace=ws, show_progress=False)
    assert again.main_set().system("candidate").predictions == tuned.predictions

    # served: the chat request's prompt (the template with the generation prompt) -> one label
    served = load_classifier_version(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    messages = [{"role": "system", "content": "Classify the message."},
                {"role": "user", "content": "gamma gamma gamma gamma gamma gamma number 999"}]
    ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert classify_prompt(served, tokenizer, ids) == "gamma"
