"""The whole pipeline on a tiny random model: trains, evaluates, tracks, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tolerance

import tuneline
from tuneline.curation import prepare
from tuneline.errors import TrainingError
from tuneline.spec import load_spec
from tuneline.train import TrainOptions, train
from tuneline.workspace import Workspace


def _load(tiny_model_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_run_trains_evaluates_and_tracks(classification_spec: Path, tmp_path: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    # 150 steps, a checkpoint every 50 (not every 2: 75 durable checkpoints cost ~10 s here)
    spec = classification_spec.read_text().replace("max_steps: 4", "max_steps: 150").replace(
        "checkpoint_every: 2", "checkpoint_every: 50")
    classification_spec.write_text(spec)
    ws = Workspace.at(tmp_path / "ws")
    result = tuneline.run(classification_spec, workspace=ws, show_progress=False)

    # training moved the model: accuracy on held-out intents went up from the random base
    report = result.report
    assert report is not None and report.main_set().n == 12
    base, tuned = report.main_set().system("base"), report.main_set().system("candidate")
    assert base is not None and tuned is not None
    assert tuned.metrics["accuracy"].value >= base.metrics["accuracy"].value + 0.3
    # every metric comes with its 95% interval, and the paired test compares the same rows
    acc = tuned.metrics["accuracy"]
    assert acc.low is not None and acc.high is not None and acc.low <= acc.value <= acc.high
    (mcnemar,) = [c for c in report.main_set().comparisons if c.metric == "accuracy"]
    assert mcnemar.test == "mcnemar" and mcnemar.b == "base"
    fixed = [f for f in report.main_set().flips["candidate_vs_base"] if f.kind == "fixed"]
    assert len(fixed) == mcnemar.a_only
    # every example starts with the same system prompt: computed once per batch, not per example
    assert 0 < result.train.computed_tokens < result.train.train_tokens
    # decoding is constrained to the label set: every answer of either model is one of the labels
    assert tuned.metrics["invalid_rate"].value == base.metrics["invalid_rate"].value == 0.0

    # the model is saved with its tokenizer and the spec
    adapter = Path(result.train.adapter_dir)
    assert (adapter / "model.safetensors").is_file() or (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    assert (adapter / "tuneline.yaml").read_text() == classification_spec.read_text()

    # the run is in the embedded MLflow store, with its artifacts inside the workspace
    mlflow.set_tracking_uri(ws.tracking_uri)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["train.max_steps"] == "150"
    assert run.data.tags["tuneline.spec_sha256"] == load_spec(classification_spec).sha256
    assert len(run.data.tags["tuneline.data.train.sha256"]) == 64
    assert "tuneline.version.torch" in run.data.tags
    assert run.data.metrics["candidate.accuracy"] == pytest.approx(tuned.metrics["accuracy"].value)
    assert run.info.artifact_uri.startswith(ws.artifact_root.as_uri())
    # where the run's time went, stage by stage; the stages are the run's time without the MLflow
    # run's opening and closing
    stage_seconds = {k.split(".", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("stage_seconds.")}
    assert set(stage_seconds) == {"prepare", "plan", "base_and_baselines", "train", "evaluate", "register"}
    assert stage_seconds["train"] > 0 and sum(stage_seconds.values()) <= result.seconds
    history = MlflowClient().get_metric_history(result.run_id, "train_loss")
    assert len(history) == 150  # every step, although written in batches
    assert history[-1].value < history[0].value
    arts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"adapter", "spec", "eval", "dataset"} <= arts
    # the curated dataset version the model was trained on, linked to the run
    version = run.data.tags["tuneline.dataset_version"]
    assert (ws.datasets_dir / version / "train.parquet").is_file()
    inputs = {(d.dataset.name, [t.value for t in d.tags if t.key == "mlflow.data.context"][0])
              for d in run.inputs.dataset_inputs}
    assert (f"{version}/train", "training") in inputs and (f"{version}/test", "evaluation") in inputs
    assert json.loads((result.run_dir / "eval_report.json").read_text())["passed"] == report.passed


def test_lora_adapter_is_saved_in_peft_format(classification_spec: Path, tiny_model_dir: Path, tmp_path: Path):
    from peft import PeftModel

    loaded = load_spec(classification_spec)
    cfg = loaded.spec.train.model_copy(update={"method": "lora", "max_steps": 2})
    data = prepare(loaded)
    model, tok = _load(tiny_model_dir)
    trained, result = train(cfg, model, tok, data.train, tmp_path, TrainOptions(show_progress=False))
    assert result.trainable_params < result.total_params / 5
    reloaded = PeftModel.from_pretrained(_load(tiny_model_dir)[0], result.adapter_dir)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    want = trained(**batch).logits.detach()
    # fp32 forwards of the same weights (the trained model may run the fused LoRA path, peft its own):
    # sums over at most the MLP's intermediate size, in another order, relative to the logits' scale
    torch.testing.assert_close(reloaded(**batch).logits, want, **tolerance(
        torch.float32, trained.config.intermediate_size, scale=float(want.abs().max())))


class _Crash(Exception):
    pass


def test_resumed_run_equals_uninterrupted(classification_spec: Path, tiny_model_dir: Path, tmp_path: Path):
    loaded = load_spec(classification_spec)
    cfg = loaded.spec.train.model_copy(update={"method": "lora", "max_steps": 6, "checkpoint_every": 2,
                                               "lora": loaded.spec.train.lora.model_copy(update={"dropout": 0.1})})
    data = prepare(loaded)

    full_model, tok = _load(tiny_model_dir)
    full, _ = train(cfg, full_model, tok, data.train, tmp_path / "a", TrainOptions(fingerprint="fp", show_progress=False))

    def crash_at_5(step: int, metrics: dict) -> None:
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train(cfg, _load(tiny_model_dir)[0], tok, data.train, tmp_path / "b", TrainOptions(fingerprint="fp",
              on_step=crash_at_5, show_progress=False))
    with pytest.raises(TrainingError, match="different spec"):
        train(cfg, _load(tiny_model_dir)[0], tok, data.train, tmp_path / "b", TrainOptions(fingerprint="other",
              resume=True, show_progress=False))
    resumed, result = train(cfg, _load(tiny_model_dir)[0], tok, data.train, tmp_path / "b", TrainOptions(fingerprint="fp",
                            resume=True, show_progress=False))
    assert result.resumed_from_step == 4
    a = {n: p for n, p in full.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=f"{n} differs after resume")


def test_resume_without_checkpoint_is_a_clear_error(classification_spec: Path, tmp_path: Path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        tuneline.run(classification_spec, workspace=tmp_path / "ws", resume=True, show_progress=False)


def test_instruction_task_reports_text_metrics(tmp_path: Path, tiny_model_dir: Path):
    from helpers import write_jsonl, write_spec

    rows = [{"prompt": f"Repeat the word {w}", "answer": w} for w in ["card", "bank", "loan", "rate"] * 3]
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = write_spec(tmp_path, f"""
        name: tiny-instruct
        task: {{type: instruction}}
        objective: {{primary: rouge_l, thresholds: ["rouge_l >= 0.0"]}}
        model: {tiny_model_dir}
        data:
          train: {{path: d.jsonl, columns: {{instruction: prompt, response: answer}}}}
          test: {{path: d.jsonl, columns: {{instruction: prompt, response: answer}}}}
        curation: {{enabled: false}}  # trains on its test rows on purpose (curation would remove them)
        train: {{method: lora, max_steps: 3, batch_size: 4, precision: fp32}}
        decoding: {{max_new_tokens: 4, no_repeat_ngram_size: 2, repetition_penalty: 1.2, stop: ["###"]}}
    """)
    ws = Workspace.at(tmp_path / "ws")
    result = tuneline.run(spec, workspace=ws, show_progress=False)
    assert result.report is not None
    # the decoding settings are recorded with the adapter (the server reads them) and in MLflow
    recorded = {"max_new_tokens": 4, "num_beams": 1, "repetition_penalty": 1.2, "no_repeat_ngram_size": 2,
                "stop": ["###"]}
    assert json.loads((Path(result.train.adapter_dir) / "decoding.json").read_text()) == recorded
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(ws.tracking_uri)
    params = MlflowClient().get_run(result.run_id).data.params
    assert (params["decoding.no_repeat_ngram_size"], params["decoding.stop"]) == ("2", '["###"]')
    assert "eval.max_new_tokens" not in params
    tuned = result.report.main_set().system("candidate")
    assert tuned is not None
    assert set(tuned.metrics) == {"rouge_l", "bleu", "chrf", "exact_match", "answer_tokens", "refusal_rate",
                                  "stopped_rate"}
    assert 0.0 <= tuned.metrics["rouge_l"].value <= 1.0
    assert len(tuned.predictions) == 4  # 12 rows, 4 distinct inputs: one evaluation item each
    assert result.report.main_set().n == 4


def test_resume_continues_the_same_tracked_run(classification_spec: Path, tmp_path: Path):
    spec = classification_spec.read_text().replace("method: full", "method: lora")
    classification_spec.write_text(spec)
    ws = Workspace.at(tmp_path / "ws")
    first = tuneline.run(classification_spec, workspace=ws, show_progress=False)
    again = tuneline.run(classification_spec, workspace=ws, resume=True, show_progress=False)
    assert again.run_id == first.run_id
    assert again.train.resumed_from_step == first.train.steps
    assert again.train.final_loss == pytest.approx(first.train.final_loss)
    assert again.report is not None and first.report is not None
    # base metrics come from the same model with the adapter switched off
    for system in ("base", "candidate"):
        assert again.report.main_set().system(system).metrics == first.report.main_set().system(system).metrics
