"""Helpers for tests: write small data files and specs."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BANKING = REPO / "examples" / "banking77" / "data"


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def banking_rows(labels: list[str], per_label: int, split: str = "train") -> list[dict[str, str]]:
    """The first ``per_label`` BANKING77 rows of each of ``labels`` (real data shipped in examples/)."""
    out: list[dict[str, str]] = []
    counts = dict.fromkeys(labels, 0)
    with (BANKING / f"{split}.csv").open() as f:
        for row in csv.DictReader(f):
            lab = row["category"]
            if lab in counts and counts[lab] < per_label:
                counts[lab] += 1
                out.append(row)
    return out


def write_spec(dir_: Path, body: str) -> Path:
    p = dir_ / "tuneline.yaml"
    p.write_text(textwrap.dedent(body).lstrip())
    return p


def lora_model(model_dir: Path, attn: str | None = None, dtype=None, **lora):
    """A LoRA-wrapped model with random (non-zero) B matrices, so the adapters change the output.

    peft starts B at zero; tests comparing two computations need adapters that matter."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneline.spec.models import LoraSpec, TrainSpec
    from tuneline.train.peft_builders import wrap_for_training

    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn} if attn else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, **kwargs)
    model = wrap_for_training(base, TrainSpec(lora=LoraSpec(**lora)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def tiny_lora_spec(dir_: Path, model_dir: Path, name: str, per_label: int = 8, max_steps: int = 3,
                   train: str | None = None, extra: str = "") -> Path:
    """A classification spec training a LoRA adapter on the tiny model in a few steps, with the
    slow evaluation extras (probe, robustness, latency) off: for registry and serving tests."""
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    write_csv(dir_ / "train.csv", banking_rows(labels, per_label))
    write_csv(dir_ / "test.csv", banking_rows(labels, 2, "test"))
    default_train = (f"{{method: lora, lr: 3.0e-2, max_steps: {max_steps}, batch_size: 8, seq_len: 96, "
                     "precision: fp32, seed: 0}")
    spec = write_spec(dir_, f"""
        name: {name}
        task: {{type: classification, instruction: Classify the message.}}
        objective: {{primary: accuracy, thresholds: ["accuracy >= 0.0"]}}
        model: {model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
        train: {train or default_train}
        eval: {{batch_size: 16, forgetting: false, robustness: {{enabled: false}}, latency: {{enabled: false}}}}
    """)
    return _append(spec, extra) if extra else spec


def _append(spec: Path, extra: str) -> Path:
    """``spec`` with the top-level YAML ``extra`` added at its end."""
    spec.write_text(spec.read_text() + textwrap.dedent(extra).strip() + "\n")
    return spec


def spec_error(dir_: Path, extra: str) -> str:
    """The SpecError message of a minimal classification spec plus ``extra`` (top-level YAML)."""
    import pytest

    from tuneline.errors import SpecError
    from tuneline.spec import load_spec

    body = "name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
    body += "data: {train: {path: train.csv}}\n" + textwrap.dedent(extra).strip() + "\n"
    (dir_ / "tuneline.yaml").write_text(body)
    with pytest.raises(SpecError) as info:
        load_spec(dir_ / "tuneline.yaml")
    return str(info.value)
