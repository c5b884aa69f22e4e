"""`tuneline compare` on the tiny model through the CLI: two methods trained and measured on the same
test items, the table, compare.json with every column, the recommendation, the report section; a
re-run reuses the finished combination; bad input stops before anything is trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import invoke_cli, tiny_lora_spec

from tuneline.compare import CompareReport, recommend
from tuneline.errors import ModelError, SpecError

FILLED = ("train_seconds", "tokens_per_second", "steps", "peak_memory_mb", "memory_kind", "adapter_bytes", "p50_ms",
          "p95_ms", "trainable_params", "total_params", "license", "vs_best", "p_vs_best", "folder")


def _cli(*args: str):
    result = invoke_cli(*args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def licensed_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny model in a folder of its own whose model card declares a license."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return folder


def _check_columns(report: dict) -> None:
    """Every combination measured, every column filled."""
    assert report["n"] == 6 and report["metric"] == "accuracy" and report["dataset_version"]
    for c in report["combinations"]:
        assert c["state"] == "complete", c
        missing = [k for k in FILLED if c[k] is None]
        assert not missing, (c["method"], missing)
        acc = c["metrics"]["accuracy"]
        assert acc["low"] <= acc["value"] <= acc["high"]
        assert c["license"] == "apache-2.0" and c["memory_kind"] == "rss" and c["peak_memory_mb"] > 0
        assert 0 < c["trainable_params"] < c["total_params"] and c["adapter_bytes"] > 0


def test_compare_two_methods_then_run_again(tmp_path: Path, licensed_model: Path):
    from tuneline.report.sections.compare import compare as compare_section

    spec = tiny_lora_spec(tmp_path, licensed_model, "tiny-compare", per_label=4, max_steps=1)
    ws = tmp_path / "ws"
    args = ("compare", str(spec), "--models", str(licensed_model), "--methods", "lora,ia3", "-w", str(ws),
            "--no-progress", "--set", "eval.latency.requests=2")

    report = json.loads(_cli(*args, "--json").stdout)
    assert [(c["method"], c["model"], c["reused"]) for c in report["combinations"]] == [
        ("lora", "tiny", False), ("ia3", "tiny", False)]
    _check_columns(report)
    lora, ia3 = report["combinations"]
    assert (lora["lr"], lora["lr_source"]) == (3.0e-2, "spec")
    assert ia3["lr"] == pytest.approx(0.3) and ia3["lr_source"] == "default for ia3"  # 10x lora's 3e-2, capped
    assert lora["adapter_bytes"] > ia3["adapter_bytes"]  # LoRA r=16 matrices against IA3's vectors
    saved = CompareReport.from_dict(json.loads((ws / "compare" / "tiny-compare" / "compare.json").read_text()))
    assert saved.recommended == report["recommended"] == recommend(saved).recommended  # the rule, re-applied
    picked = saved.get(saved.recommended)
    assert picked is not None and (picked.label == saved.best or (picked.p_vs_best or 0) >= 0.05)
    assert saved.reasons[-1].startswith("Cost order:")
    results = sorted((ws / "compare" / "tiny-compare").glob("*/result.json"))
    assert len(results) == 2
    finished_at = [r.stat().st_mtime_ns for r in results]

    again = _cli(*args).output  # the same comparison: nothing is trained again
    assert "lora @ tiny: measured before" in again and "ia3 @ tiny: measured before" in again
    assert [r.stat().st_mtime_ns for r in results] == finished_at
    assert "which model and method? 2 combinations on the same 6 test items" in again
    assert f"recommendation: {saved.recommended}" in again and "(reused)" in again

    page = compare_section(saved.to_dict())
    assert 'id="compare"' in page and "lora @ tiny" in page and f"Recommendation: {saved.recommended}" in page


@pytest.mark.slow
def test_a_method_added_later_trains_alone_and_the_report_shows_the_comparison(tmp_path: Path, licensed_model: Path):
    from tuneline.report import write_report

    spec = tiny_lora_spec(tmp_path, licensed_model, "tiny-compare", per_label=4, max_steps=1)
    ws = tmp_path / "ws"
    common = ("--models", str(licensed_model), "-w", str(ws), "--no-progress", "--set", "eval.latency.requests=2")
    first = _cli("compare", str(spec), "--methods", "lora", *common).output
    assert "recommendation: lora @ tiny" in first
    (lora_dir,) = (ws / "compare" / "tiny-compare").glob("tiny-lora-*")
    finished_at = (lora_dir / "result.json").stat().st_mtime_ns

    second = _cli("compare", str(spec), "--methods", "lora,prompt", *common, "--json")
    assert "lora @ tiny: measured before" in second.stderr
    report = json.loads(second.stdout)
    assert [(c["method"], c["reused"]) for c in report["combinations"]] == [("lora", True), ("prompt", False)]
    assert (lora_dir / "result.json").stat().st_mtime_ns == finished_at  # not trained again
    _check_columns(report)

    page = write_report(report["mlflow_run_id"], ws).read_text()
    assert 'id="compare"' in page and "Which model and method?" in page
    assert "prompt @ tiny" in page and f"Recommendation: {report['recommended']}" in page


def test_bad_input_stops_before_anything_is_trained(tmp_path: Path, tiny_model_dir: Path):
    spec = tiny_lora_spec(tmp_path, tiny_model_dir, "tiny-compare-bad")
    ws = tmp_path / "ws"

    def refused(*args: str) -> Exception:
        result = invoke_cli("compare", str(spec), "-w", str(ws), *args)
        assert result.exit_code != 0 and result.exception is not None
        return result.exception

    unknown = refused("--methods", "lora,lorra")
    assert isinstance(unknown, SpecError) and "unknown method 'lorra'" in str(unknown)
    assert "did you mean 'lora'" in str(unknown)
    nowhere = refused("--models", f"{tiny_model_dir},no-such-model")
    assert isinstance(nowhere, ModelError) and "model 'no-such-model' (--models) does not resolve" in str(nowhere)
    spec.write_text(spec.read_text().replace("seq_len: 96,", "seq_len: 96, packing: true,"))
    packed = refused("--methods", "lora,prefix")
    assert isinstance(packed, SpecError) and "the spec with prefix @ " in str(packed)
    assert "packing is not available with method 'prefix'" in str(packed)
    assert not (ws / "compare").exists() and not (ws / "datasets").exists()  # nothing curated, nothing trained


@pytest.mark.slow
@pytest.mark.parametrize("backend", [("--workers", "2"), ("--ray",)], ids=["processes", "ray"])
def test_combinations_run_in_worker_processes_or_on_ray(tmp_path: Path, licensed_model: Path, backend: tuple[str, ...]):
    if backend == ("--ray",):
        pytest.importorskip("ray")
    spec = tiny_lora_spec(tmp_path, licensed_model, "tiny-compare", per_label=4, max_steps=1)
    ws = tmp_path / "ws"
    report = json.loads(_cli("compare", str(spec), "--models", str(licensed_model), "--methods", "lora,ia3",
                             "-w", str(ws), "--no-progress", "--set", "eval.latency.requests=2", *backend,
                             "--json").stdout)
    assert [c["method"] for c in report["combinations"]] == ["lora", "ia3"]  # the order asked, whatever finished first
    assert report["backend"] == ("ray" if backend == ("--ray",) else "processes")
    _check_columns(report)


@pytest.mark.slow  # a LoRA and a classifier-head training on the tiny model
def test_the_classifier_head_is_compared_beside_a_generative_method(tmp_path: Path, licensed_model: Path):
    spec = tiny_lora_spec(tmp_path, licensed_model, "tiny-heads", per_label=4, max_steps=2)
    report = json.loads(_cli("compare", str(spec), "--models", str(licensed_model), "--methods", "lora,classifier",
                             "-w", str(tmp_path / "ws"), "--no-progress", "--set", "eval.latency.requests=2",
                             "--json").stdout)
    _check_columns(report)
    lora, head = report["combinations"]
    assert (lora["head"], head["head"], head["method"]) == ("generative", "classifier", "lora")
    saved = json.loads((tmp_path / "ws" / "compare" / "tiny-heads" / "compare.json").read_text())
    assert set(saved["combinations"][1]["predictions"]) <= {"card_arrival", "lost_or_stolen_card", "exchange_rate"}
