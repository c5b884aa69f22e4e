"""`train.distributed`: ddp by default; fsdp only where it means something (full fine-tuning,
without rank-0 validation), refused in the spec with the field named, before any process starts."""

from __future__ import annotations

from pathlib import Path

from helpers import spec_error

from tuneline.spec import parse_spec

BODY = ("name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
        "data: {train: {path: train.csv}}\n")


def test_ddp_is_the_default_and_fsdp_shards_full_fine_tuning() -> None:
    assert parse_spec(BODY, "spec.yaml").train.distributed.strategy == "ddp"
    spec = parse_spec(BODY + "train: {method: full, distributed: {strategy: fsdp}}\n", "spec.yaml")
    assert spec.train.distributed.strategy == "fsdp"


def test_fsdp_for_an_adapter_or_with_early_stopping_is_refused_naming_the_field(tmp_path: Path) -> None:
    text = spec_error(tmp_path, "train: {method: lora, distributed: {strategy: fsdp}}")
    assert "train" in text and "fsdp shards full fine-tuning; method 'lora' trains an adapter" in text
    text = spec_error(tmp_path, "train: {method: full, distributed: {strategy: fsdp}, "
                                "early_stopping: {metric: accuracy, every: 5}}")
    assert "early_stopping validates on rank 0 alone" in text
    assert "strategy" in spec_error(tmp_path, "train: {distributed: {strategy: zero3}}")
