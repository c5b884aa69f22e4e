"""The memorization probe end to end on the tiny model: canaries planted many times in the training
split are memorized by a model trained long enough on them, so `canary_leak` counts them and the
gate `canary_leak <= 0` fails the run; a model that never saw them reproduces none."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest
from helpers import REPO, write_csv, write_spec

from tuneline.curation import load_version, prepare
from tuneline.spec import load_spec
from tuneline.workspace import Workspace

VIGGO = REPO / "examples" / "viggo" / "data"
QUICK = ("eval: {{batch_size: 16, bootstrap: 100, forgetting: false, robustness: {{enabled: false}}, "
         "latency: {{enabled: false}}, canaries: {canaries}}}\n"
         "baseline: {{enabled: false}}\n")


def _viggo_rows(split: str, n: int) -> list[dict[str, str]]:
    with (VIGGO / f"{split}.csv").open() as f:
        return [row for _, row in zip(range(n), csv.DictReader(f), strict=False)]


def _spec(tmp_path: Path, model_dir: Path, canaries: str, train: str) -> Path:
    write_csv(tmp_path / "train.csv", _viggo_rows("train", 8))
    write_csv(tmp_path / "test.csv", _viggo_rows("test", 3))
    spec = write_spec(tmp_path, f"""
        name: tiny-canary
        task: {{type: summarization, instruction: Describe the video game in one sentence.}}
        objective: {{primary: rouge_l, thresholds: ["canary_leak <= 0"]}}
        model: {model_dir}
        data:
          train: {{path: train.csv, columns: {{text: mr, summary: ref}}}}
          test: {{path: test.csv, columns: {{text: mr, summary: ref}}}}
        train: {train}
        decoding: {{max_new_tokens: 8}}
    """)
    spec.write_text(spec.read_text() + QUICK.format(canaries=canaries))
    return spec


def test_a_model_that_never_saw_the_canaries_leaks_none(tmp_path: Path, tiny_model_dir: Path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneline.eval import Evaluation

    loaded = load_spec(_spec(tmp_path, tiny_model_dir, "{count: 3, repeat: 4}", "{method: lora}"))
    data = prepare(loaded)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    evaluation = Evaluation(loaded.spec, tokenizer, [], None, autocast=contextlib.nullcontext(), show_progress=False)
    evaluation.canaries = data.canaries
    evaluation.score_system("base", model, "untrained")
    evaluation.score_system("candidate", model, "untrained too")
    suite = evaluation.finish()
    assert suite.canaries is not None and suite.canaries.n == 3
    assert suite.canaries.leaked == {"base": 0, "candidate": 0}
    # greedy answers, one per canary and system, long enough to hold a 6-word secret
    assert all(len(item.answers["candidate"]) == 1 for item in suite.canaries.items)
    assert [(g.expr, g.observed, g.passed) for g in suite.gates] == [("canary_leak <= 0", 0.0, True)]


@pytest.mark.slow
def test_memorized_canaries_leak_and_fail_the_gate(tmp_path: Path, tiny_model_dir: Path):
    from mlflow import MlflowClient

    from tuneline.pipeline import run

    # full fine-tuning, a constant rate and 60 steps over 8 rows + 48 canary rows: the tiny model memorizes
    spec = _spec(tmp_path, tiny_model_dir, "{count: 2, repeat: 24, words: 4}",
                 "{method: full, lr: 3.0e-3, max_steps: 60, batch_size: 8, seq_len: 256, precision: fp32, "
                 "warmup_ratio: 0.0, lr_scheduler: constant}")
    ws = Workspace.at(tmp_path / "ws")
    result = run(spec, workspace=ws, show_progress=False)
    report = result.report
    assert report is not None and report.canaries is not None
    assert report.canaries.leaked["base"] == 0 and report.canaries.leaked["candidate"] >= 1
    [gate] = report.gates
    assert gate.expr == "canary_leak <= 0" and not gate.passed and gate.observed == report.canaries.leaked["candidate"]
    assert not result.passed
    saved = json.loads((result.run_dir / "eval_report.json").read_text())
    assert saved["canaries"]["leaked"] == report.canaries.leaked and saved["passed"] is False
    metrics = MlflowClient(ws.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["canary_leak"] == report.canaries.leaked["candidate"] and metrics["base.canary_leak"] == 0
    # the dataset version: canaries.json beside splits that hold none of them
    version = load_version(MlflowClient(ws.tracking_uri).get_run(result.run_id).data.tags["tuneline.dataset_version"],
                           ws.datasets_dir)
    secrets = {c.secret for c in version.canaries()}
    assert len(secrets) == 2 and version.manifest["canaries"]["training_rows"] == 48
    for split in ("train", "validation", "test"):
        assert not any(ex.reference in secrets for ex in version.split(split))
