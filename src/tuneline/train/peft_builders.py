"""Wrap a base model for the spec's training method (LoRA through peft, or full fine-tuning)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from tuneline.spec.models import TrainSpec
from tuneline.train import fast_lora

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel


def causal_lm_of(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel, or ``model`` itself (a PreTrainedModel)."""
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel's
    return cast("PreTrainedModel", model if get_base_model is None else get_base_model())


def build_peft_config(train: TrainSpec) -> LoraConfig:
    from peft import LoraConfig, TaskType

    lora = train.lora
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )


def wrap_for_training(model: PreTrainedModel, train: TrainSpec) -> PeftModel | PreTrainedModel:
    """Return the model to train: a PeftModel for LoRA, the model itself for ``full``."""
    if train.gradient_checkpointing:
        # non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads hack)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if train.compile:
            compile_layers(model)
        return model
    import torch
    from peft import get_peft_model

    peft_model = get_peft_model(model, build_peft_config(train))
    # adapter weights (and so their optimizer state) stay fp32 even when the base is bf16
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if train.fused_lora:
        # grouping hands outputs between modules through Python state, which compiled graphs do not trace
        fast_lora.install(peft_model, group=not train.compile)
    if train.compile:
        compile_layers(peft_model)
    return peft_model


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` every decoder layer in place; return how many.

    Regional compilation: the layers share one compiled graph (same code, same shapes), so compile
    time is that of one layer rather than of the whole model. Dynamic shapes, since batch widths vary.
    """
    causal_lm = causal_lm_of(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
