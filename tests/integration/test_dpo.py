"""train.method: dpo end to end on the tiny model: LoRA on the rows, then TRL's DPO on the version's
preference pairs; the policy moves toward the chosen answers and ships as a plain LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import banking_rows, write_csv, write_jsonl, write_spec

import tuneline
from tuneline.curation.version import load_version
from tuneline.workspace import Workspace

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]


@pytest.mark.slow  # TRL and datasets load, then two trainings: ~60 s here
def test_dpo_trains_on_the_pairs_and_ships_a_lora_adapter(tmp_path: Path, tiny_model_dir: Path):
    write_csv(tmp_path / "train.csv", banking_rows(LABELS, 8))
    write_csv(tmp_path / "test.csv", banking_rows(LABELS, 2, "test"))
    # the pairs prefer each message's own intent over the next one
    rows = banking_rows(LABELS, 12)[-12:]
    write_jsonl(tmp_path / "prefs.jsonl", [
        {"text": r["text"], "chosen": r["category"], "rejected": LABELS[(LABELS.index(r["category"]) + 1) % 3]}
        for r in rows])
    spec = write_spec(tmp_path, f"""
        name: tiny-dpo
        task: {{type: classification, instruction: Classify the message.}}
        objective: {{primary: accuracy}}
        model: {tiny_model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
          preferences: {{path: prefs.jsonl}}
        train:
          method: dpo
          lr: 3.0e-2
          max_steps: 3
          batch_size: 8
          seq_len: 96
          precision: fp32
          dpo: {{lr: 1.0e-2, max_steps: 4, batch_size: 4, beta: 0.1}}
        eval: {{batch_size: 16, forgetting: false, robustness: {{enabled: false}}, latency: {{enabled: false}},
               compare_base: false}}
        baseline: {{enabled: false}}
    """)
    ws = Workspace.at(tmp_path / "ws")
    result = tuneline.run(spec, workspace=ws, show_progress=False)

    run_dir = ws.run_dir("tiny-dpo")
    dpo = json.loads((run_dir / "dpo_result.json").read_text())
    (version_dir,) = [p for p in ws.datasets_dir.iterdir() if p.name.startswith("ds-")]
    version = load_version(version_dir.name, ws.datasets_dir)
    kept = version.manifest["preferences"]
    # what DPO trained on is what the version holds; every pair curation dropped is counted
    assert dpo["pairs"] == kept["pairs"] == len(version.preferences()) >= 10
    assert kept["pairs"] + sum(kept["dropped"].values()) == len(rows)
    assert dpo["steps"] == 4
    # after DPO the policy gives the chosen answers more likelihood, relative to the reference, than the rejected
    assert dpo["reward_margin"] > 0 and dpo["history"][-1]["rewards/margins"] > dpo["history"][0]["rewards/margins"]
    adapter = Path(result.train.adapter_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not (adapter / "ref").exists()  # TRL's reference copy is not shipped
    assert result.report is not None and result.report.main_set().system("candidate") is not None
