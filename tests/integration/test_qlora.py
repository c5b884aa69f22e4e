"""`train.method: qlora`: LoRA trained on the base quantized to 4-bit NormalFloat with bitsandbytes
(whose CPU backend runs the 4-bit layers here), then evaluated and served as LoRA merged into the
unquantized base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_lora_spec

import tuneline
from tuneline.workspace import Workspace

pytest.importorskip("bitsandbytes")

QLORA = "{method: qlora, lr: 3.0e-2, max_steps: 8, batch_size: 8, seq_len: 96, precision: fp32, seed: 0}"


def test_a_4bit_base_holds_its_linear_weights_in_nf4_and_trains_only_the_adapter(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb
    import torch

    from tuneline.models import load_model, resolve_model_source
    from tuneline.spec.models import TrainSpec
    from tuneline.train.peft_builders import wrap_for_training

    source = resolve_model_source(str(tiny_model_dir), tiny_model_dir)
    plain = load_model(source, tiny_model_dir.parent, dtype="fp32")
    base = load_model(source, tiny_model_dir.parent, dtype="nf4-fp32")
    linears = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == sum(1 for n, m in plain.named_modules()
                               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert all(m.weight.quant_type == "nf4" for m in linears)
    assert base.get_memory_footprint() < plain.get_memory_footprint()

    model = wrap_for_training(base, TrainSpec.model_validate(json.loads(
        '{"method": "qlora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}')))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no adapter weight moved"


def test_a_qlora_run_trains_on_the_4bit_base_and_evaluates_what_is_served(tmp_path: Path, tiny_model_dir: Path) -> None:
    from mlflow import MlflowClient

    spec = tiny_lora_spec(tmp_path, tiny_model_dir, "qlora", train=QLORA, extra="baseline: {enabled: false}")
    ws = Workspace.at(tmp_path / "ws")
    result = tuneline.run(spec, workspace=ws, show_progress=False)
    client = MlflowClient(ws.tracking_uri)
    assert client.get_run(result.run_id).data.tags["tuneline.base_dtype"] == "nf4-fp32"
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    config = json.loads((Path(result.train.adapter_dir) / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # a plain LoRA adapter: served, merged and exported as one
    assert result.report is not None and result.report.main_set().system("candidate") is not None
