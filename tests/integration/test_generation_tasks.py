"""The summarization and chat task types end to end on the tiny model: `tuneline run` curates a few
rows, trains a LoRA adapter, scores the base and the candidate on the task's metrics, and registers
the candidate, which the server then answers with."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from helpers import REPO, banking_rows, write_csv, write_jsonl, write_spec

from tuneline.pipeline import RunResult, run
from tuneline.spec import COMMON_METRICS, TASK_METRICS
from tuneline.workspace import Workspace

VIGGO = REPO / "examples" / "viggo" / "data"
# the slow evaluation extras and the baselines off: what is checked here is that the task type runs end to end
QUICK = ("eval: {batch_size: 8, bootstrap: 100, forgetting: false, robustness: {enabled: false}, latency: {enabled: false}}\n"
         "baseline: {enabled: false}\n")


def _viggo_rows(split: str, n: int) -> list[dict[str, str]]:
    """The first ``n`` rows of a shipped ViGGO split (an input's descriptions are adjacent)."""
    with (VIGGO / f"{split}.csv").open() as f:
        return [row for _, row in zip(range(n), csv.DictReader(f), strict=False)]


def _assert_run(result: RunResult, ws: Workspace, spec_name: str, task: str, items: int) -> None:
    """What a user sees after `tuneline run`: an adapter, a report with the task's metrics and the
    candidate's answers, the report on disk, and the candidate registered."""
    adapter = Path(result.train.adapter_dir)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (adapter / "tuneline.yaml").is_file() and (adapter / "decoding.json").is_file()
    report = result.report
    assert report is not None and report.passed
    main = report.main_set()
    assert main.n == items
    for system in ("base", "candidate"):
        scored = main.system(system)
        assert scored is not None
        assert set(scored.metrics) == {*TASK_METRICS[task], *COMMON_METRICS}
        assert all(0.0 <= scored.metrics[m].value <= 1.0 for m in TASK_METRICS[task])
        assert len(scored.predictions) == items and all(isinstance(p, str) for p in scored.predictions)
    saved = json.loads((result.run_dir / "eval_report.json").read_text())
    assert saved["passed"] is True and {g["expr"] for g in saved["gates"]} == {g.expr for g in report.gates}
    from mlflow import MlflowClient

    assert result.model_version == 1
    version = MlflowClient(ws.tracking_uri).get_model_version_by_alias(spec_name, "candidate")
    assert str(version.version) == "1" and version.run_id == result.run_id


def test_summarization_runs_end_to_end_with_every_reference(tmp_path: Path, tiny_model_dir: Path):
    write_csv(tmp_path / "train.csv", _viggo_rows("train", 12))
    test = _viggo_rows("test", 7)
    write_csv(tmp_path / "test.csv", test)
    spec = write_spec(tmp_path, f"""
        name: tiny-describe
        task: {{type: summarization, instruction: Describe the video game in one sentence.}}
        objective: {{primary: rouge_l, thresholds: ["rouge_l >= 0.0", "bleu - base.bleu >= -1.0"]}}
        model: {tiny_model_dir}
        data:
          train: {{path: train.csv, columns: {{text: mr, summary: ref}}}}
          test: {{path: test.csv, columns: {{text: mr, summary: ref}}}}
        train: {{method: lora, lr: 1.0e-2, max_steps: 2, batch_size: 4, seq_len: 256, precision: fp32}}
        decoding: {{max_new_tokens: 8}}
    """)
    spec.write_text(spec.read_text() + QUICK)
    ws = Workspace.at(tmp_path / "ws")
    result = run(spec, workspace=ws, show_progress=False)
    inputs = list(dict.fromkeys(row["mr"] for row in test))
    _assert_run(result, ws, "tiny-describe", "summarization", items=len(inputs))
    # the descriptions of one input are its references, all scored against
    main = result.report.main_set()  # type: ignore[union-attr]
    assert sorted(map(len, main.all_references())) == sorted(sum(r["mr"] == i for r in test) for i in inputs)
    assert max(map(len, main.all_references())) > 1


def _conversation(i: int, row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    card = ("debit", "credit", "travel")[i % 3]
    return {"messages": [
        {"role": "user", "content": row["text"]},
        {"role": "assistant", "content": "Which of your cards is it about?"},
        {"role": "user", "content": f"My {card} card, the one ending in {1000 + 37 * i}."},
        {"role": "assistant", "content": f"Thanks. This is {row['category'].replace('_', ' ')}."}]}


def test_chat_runs_end_to_end_and_the_registered_candidate_answers(tmp_path: Path, tiny_model_dir: Path):
    from fastapi.testclient import TestClient

    from tuneline.serve import build_app

    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    write_jsonl(tmp_path / "train.jsonl", [_conversation(i, r) for i, r in enumerate(banking_rows(labels, 4))])
    test = [_conversation(100 + i, r) for i, r in enumerate(banking_rows(labels, 2, "test"))]
    write_jsonl(tmp_path / "test.jsonl", test)
    spec = write_spec(tmp_path, f"""
        name: tiny-chat
        task: {{type: chat, instruction: You are a bank's support assistant.}}
        objective: {{primary: chrf, thresholds: ["chrf >= 0.0"]}}
        model: {tiny_model_dir}
        data:
          train: {{path: train.jsonl}}
          test: {{path: test.jsonl}}
        train: {{method: lora, lr: 1.0e-2, max_steps: 2, batch_size: 4, seq_len: 256, precision: fp32}}
        decoding: {{max_new_tokens: 8}}
    """)
    spec.write_text(spec.read_text() + QUICK)
    ws = Workspace.at(tmp_path / "ws")
    result = run(spec, workspace=ws, show_progress=False)
    _assert_run(result, ws, "tiny-chat", "chat", items=len(test))
    main = result.report.main_set()  # type: ignore[union-attr]
    # each conversation's last assistant turn is its reference; the turns before it are the prompt
    assert sorted(main.references) == sorted(c["messages"][-1]["content"] for c in test)

    app = build_app(ws.root, keys=None, base=str(tiny_model_dir))
    conversation = test[0]["messages"][:-1]
    with TestClient(app, base_url="http://localhost") as client:  # without keys: localhost only
        r = client.post("/v1/chat/completions", json={"model": "tiny-chat@candidate", "messages": conversation,
                                                      "max_tokens": 8})
    app.state.engine.close()
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)
