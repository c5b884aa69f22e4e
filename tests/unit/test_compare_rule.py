"""`tuneline compare` without training: the recommendation rule on constructed results, the
learning rate a method gets, --set and --methods parsing, and the checks before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_spec

from tuneline.compare.plan import LR_FACTOR, default_lr, parse_methods, parse_overrides, plan
from tuneline.compare.results import COST_RULE, CompareReport, Measured, recommend
from tuneline.errors import ModelError, SpecError
from tuneline.eval.results import Estimate
from tuneline.spec import load_spec
from tuneline.spec.models import TrainSpec

N = 200


def _measured(method: str, right: int, *, p50: float = 10.0, adapter: int = 1000, trainable: int = 100,
              model: str = "tiny") -> Measured:
    """A combination that answered the first ``right`` of N items correctly."""
    correct = [i < right for i in range(N)]
    acc = right / N
    return Measured(model, method, "generative", method, "complete", 1e-3, "spec",
                    metrics={"accuracy": Estimate(acc, acc - 0.05, acc + 0.05)}, train_seconds=60.0,
                    tokens_per_second=1000.0, steps=10, peak_memory_mb=500.0, memory_kind="rss",
                    adapter_bytes=adapter, p50_ms=p50, p95_ms=p50 * 1.5, trainable_params=trainable,
                    total_params=10_000, license="apache-2.0", scores=[float(c) for c in correct], correct=correct,
                    predictions=["x"] * N)


def _report(*measured: Measured) -> CompareReport:
    return recommend(CompareReport("s", "accuracy", "test", N, "v1", "sha", list(measured)), resamples=200)


def test_the_best_is_recommended_when_it_is_also_the_cheapest():
    report = _report(_measured("lora", 180, p50=10, adapter=1000),
                     _measured("ia3", 178, p50=10, adapter=5000),
                     _measured("prompt", 120, p50=10, adapter=10))
    assert report.best == report.recommended == "lora @ tiny"
    assert "it has the best accuracy" in report.reasons[0]
    assert "cheapest of the 2 options within noise" in report.reasons[0]
    assert "Significantly worse than the best (p < 0.05): prompt @ tiny" in report.reasons[1]
    # prompt is the smallest adapter, but significantly worse: never recommended
    prompt = report.get("prompt @ tiny")
    assert prompt is not None and prompt.p_vs_best is not None and prompt.p_vs_best < 0.05
    assert prompt.test == "mcnemar"


def test_a_cheaper_option_tied_with_the_best_is_recommended():
    report = _report(_measured("dora", 181, p50=10.0, adapter=9000, trainable=900),
                     _measured("ia3", 179, p50=10.5, adapter=2000, trainable=50))
    assert report.best == "dora @ tiny"
    assert report.recommended == "ia3 @ tiny"  # 5% slower is within the latency tie; smaller adapter
    ia3 = report.get("ia3 @ tiny")
    assert ia3 is not None and ia3.p_vs_best is not None and ia3.p_vs_best >= 0.05
    assert ia3.vs_best is not None and ia3.vs_best.value == pytest.approx(-0.01)
    assert "is not significantly below the best (dora @ tiny" in report.reasons[0]
    assert "adapter 2.0 KB" in report.reasons[0] and "adapter 8.8 KB" in report.reasons[0]
    assert report.reasons[-1] == f"Cost order: {COST_RULE}."


def test_latency_decides_before_adapter_size_beyond_the_tie():
    report = _report(_measured("lora", 180, p50=10.0, adapter=9000),
                     _measured("prompt", 180, p50=14.0, adapter=100))
    assert report.recommended == "lora @ tiny"  # 40% slower: latency decides, not the adapter


def test_exact_ties_pick_the_same_option_every_time():
    a, b = _measured("lora", 180), _measured("dora", 180)
    assert _report(a, b).recommended == _report(_measured("dora", 180), _measured("lora", 180)).recommended


def test_failed_combinations_are_left_out_and_the_report_round_trips():
    failed = Measured("tiny", "prefix", "generative", "k", "failed", 1e-2, "default for prefix", error="boom")
    report = _report(_measured("lora", 150), failed)
    assert report.recommended == "lora @ tiny"
    back = CompareReport.from_dict(report.to_dict())
    assert back.get("prefix @ tiny").error == "boom"  # type: ignore[union-attr]
    assert back.get("lora @ tiny").vs_best == Estimate(0.0, 0.0, 0.0)  # type: ignore[union-attr]
    # read back from JSON (no aggregates): the same decision from the per-item answers
    assert recommend(back, resamples=200).recommended == "lora @ tiny"
    assert _report(failed).reasons == ["no combination was measured"]


def test_a_method_gets_a_learning_rate_scaled_for_it():
    lora = TrainSpec(method="lora", lr=2e-4)
    assert default_lr(lora, "lora") == 2e-4
    assert default_lr(lora, "dora") == 2e-4
    assert default_lr(lora, "ia3") == pytest.approx(2e-3)
    assert default_lr(lora, "prompt") == pytest.approx(6e-3)
    assert default_lr(lora, "full") == pytest.approx(2e-5)
    assert default_lr(TrainSpec(method="lora", lr=3e-2), "prompt") == 0.3  # capped
    assert default_lr(TrainSpec(method="prompt", lr=3e-2), "lora") == pytest.approx(1e-3)
    assert set(LR_FACTOR) >= {"lora", "dora", "rslora", "ia3", "prefix", "prompt", "full"}


def test_methods_and_overrides_parse_or_say_what_is_wrong():
    assert parse_methods(["lora", "classifier"]) == [("lora", "generative"), ("lora", "classifier")]
    with pytest.raises(SpecError, match=r"unknown method 'lorra'.*did you mean 'lora'"):
        parse_methods(["lorra"])
    sets = parse_overrides(["train.max_steps=5", "ia3:train.lr=5e-3"], ["lora", "ia3"])
    assert [(o.path, o.value, o.method) for o in sets] == [("train.max_steps", 5, None), ("train.lr", 5e-3, "ia3")]
    with pytest.raises(SpecError, match="not PATH=VALUE"):
        parse_overrides(["train.lr"], ["lora"])
    with pytest.raises(SpecError, match="names method 'prompt', which --methods does not list"):
        parse_overrides(["prompt:train.lr=1"], ["lora"])
    with pytest.raises(SpecError, match="cannot change train.method"):
        parse_overrides(["train.method=ia3"], ["lora"])


def _spec(tmp_path: Path, task: str = "type: classification", extra: str = "") -> Path:
    (tmp_path / "train.csv").write_text("text,label\nhello,a\n")
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    primary = "accuracy" if "classification" in task else "rouge_l"
    return write_spec(tmp_path, f"""
        name: s
        task: {{{task}}}
        objective: {{primary: {primary}}}
        model: model
        data: {{train: {{path: train.csv}}}}
        train: {{method: lora, lr: 1.0e-3}}
        {extra}
    """)


def test_plan_checks_every_combination_before_training(tmp_path: Path):
    loaded = load_spec(_spec(tmp_path))
    planned = plan(loaded, ["model"], ["lora", "ia3"], ["train.max_steps=7", "ia3:train.lr=5e-3"])
    assert [(p.combination.label, p.spec.train.lr, p.lr_source, p.spec.train.max_steps) for p in planned] == [
        ("lora @ model", 1e-3, "spec", 7), ("ia3 @ model", 5e-3, "--set", 7)]
    with pytest.raises(ModelError, match="model 'nowhere/../x' .*does not resolve"):
        plan(loaded, ["nowhere/../x"], ["lora"], [])
    with pytest.raises(SpecError, match="--set train.nope: no such field"):
        plan(loaded, ["model"], ["lora"], ["train.nope=1"])


def test_a_method_that_cannot_apply_is_refused(tmp_path: Path):
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace("lr: 1.0e-3}", "lr: 1.0e-3, packing: true}"))
    with pytest.raises(SpecError) as info:
        plan(load_spec(spec), ["model"], ["lora", "prompt"], [])
    assert str(info.value).startswith("the spec with prompt @ model is not valid")
    assert "tuneline.yaml with prompt @ model: train.packing: packing is not available with method 'prompt'" in str(
        info.value)
    assert "--set prompt:PATH=VALUE" in str(info.value)
    generation = load_spec(_spec(tmp_path, task="type: summarization"))
    with pytest.raises(SpecError, match="the classifier head needs a classification task"):
        plan(generation, ["model"], ["lora", "classifier"], [])
