"""Wrap a base model for the spec's training method: peft's LoRA, DoRA, rsLoRA, QLoRA (LoRA on a 4-bit
base), IA3, prefix or prompt tuning, or full fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from tuneline.errors import Problem, TrainingError
from tuneline.spec.methods import LORA_SHAPED
from tuneline.spec.models import LoraSpec, TrainSpec
from tuneline.train import fast_lora

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel


def causal_lm_of(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel, or ``model`` itself (a PreTrainedModel)."""
    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel's
    return cast("PreTrainedModel", model if get_base_model is None else get_base_model())


def build_peft_config(train: TrainSpec, model: PreTrainedModel | None = None) -> PeftConfig:
    """peft's configuration for ``train.method`` (any method but ``full``). ``model``: the base, whose
    tokenizer folder prompt tuning reads when ``train.prompt.init_text`` is set."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    method = train.method
    if method in LORA_SHAPED:
        lora = train.lora
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            use_dora=method == "dora", use_rslora=method == "rslora", **lora_placement(lora, model),
        )
    if method == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(train.ia3.target_modules),
                         feedforward_modules=list(train.ia3.feedforward_modules))
    prompt = train.prompt
    if method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.virtual_tokens,
                                  prefix_projection=prompt.projection)
    if method == "prompt":
        if prompt.init_text:
            where = getattr(getattr(model, "config", None), "name_or_path", None)
            if not where:
                raise TrainingError(Problem("prompt tuning from init_text needs the base model's tokenizer folder",
                                            field="train.prompt.init_text", hint="drop init_text to start from "
                                            "embeddings of sampled vocabulary tokens"))
            return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=prompt.init_text, tokenizer_name_or_path=str(where))
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    raise TrainingError(Problem(f"method {method!r} has no adapter configuration", field="train.method"))


def lora_placement(lora: LoraSpec, model: torch.nn.Module | None) -> dict[str, Any]:
    """peft's ``target_modules`` and ``layers_to_transform`` for ``lora``: as given for every layer;
    with ``lora.layers: N``, the last N of ``model``'s decoder layers, and "all-linear" spelled out
    as the names of a decoder layer's linears (peft takes a layer subset only with a list of names)."""
    if lora.layers is None:
        return {"target_modules": lora.target_modules, "layers_to_transform": None}
    import torch  # lazy: the training path has it loaded already

    causal_lm = causal_lm_of(model) if model is not None else None
    layers = getattr(getattr(causal_lm, causal_lm.base_model_prefix, None), "layers", None) if causal_lm else None
    if not layers:
        raise TrainingError(Problem("train.lora.layers needs the base model's decoder layers, which tuneline does "
                                    "not find in it", field="train.lora.layers",
                                    hint="remove train.lora.layers to adapt every layer"))
    total = len(layers)
    if lora.layers > total:
        raise TrainingError(Problem(f"train.lora.layers is {lora.layers}, but the base model has {total} decoder "
                                    "layers", field="train.lora.layers", hint=f"set it to at most {total}, or remove "
                                    "it to adapt every layer"))
    targets = lora.target_modules
    if targets == "all-linear":
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in layers[0].named_modules()
                          if isinstance(m, torch.nn.Linear)})
    return {"target_modules": targets, "layers_to_transform": list(range(total - lora.layers, total))}


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft model with virtual tokens (prefix or prompt tuning): its forward adds
    them, so the decoder cannot be called on its own and a KV cache of shared prompt tokens does not apply."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def wrap_for_training(model: PreTrainedModel, train: TrainSpec) -> PeftModel | PreTrainedModel:
    """Return the model to train: a PeftModel for an adapter method, the model itself for ``full``."""
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

    if getattr(model, "is_loaded_in_4bit", False):
        # qlora: peft's preparation of a quantized base (norms and embeddings in fp32, input gradients on)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, build_peft_config(train, model))
    # adapter weights (and so their optimizer state) stay fp32 even when the base is bf16
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if train.fused_lora and train.method in LORA_SHAPED:  # DoRA's layers keep peft's forward (fast_lora skips them)
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
