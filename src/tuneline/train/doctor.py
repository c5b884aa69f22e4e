"""``tuneline doctor [SPEC]``: what this machine offers, and what a spec's training will use on it.

The machine: processor and whether it multiplies bf16 natively, cores, PyTorch, the GPU and its
memory. For a spec: the device, the compute precision and why, the dtype of the frozen base
weights, the attention kernel, and a memory estimate of one training step.

The estimate builds the spec's model with its adapter on PyTorch's ``meta`` device (no weights are
loaded or allocated), so the parameter counts are exact: total, trainable, the weights' bytes in
the dtypes the trainer keeps them in (a bf16 base with fp32 adapter weights, or fp32 master weights
for a full fine-tune), their gradients and AdamW's two fp32 moments. Activations and logits are an
estimate from the shapes (micro-batch of ``batch_size`` rows of ``seq_len`` tokens; every layer's
saved inputs of its projections, attention probabilities (kept by the eager attention the CPU
trains short rows with; SDPA's fused kernels keep none) and MLP; one layer's only, plus each
layer's input, under gradient checkpointing; fp32 logits and their gradient over the vocabulary),
an upper bound for padded batches whose rows are shorter than ``seq_len``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.models import resolve_model_source
from tuneline.models.loading import model_dir_for, training_attention
from tuneline.runtime.compute import Compute, cpu_has_fast_bf16
from tuneline.spec.methods import PROMPT_LEARNING
from tuneline.train.classifier import classifier_from_causal_lm, wrap_classifier
from tuneline.train.peft_builders import wrap_for_training

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    from tuneline.spec import LoadedSpec
    from tuneline.spec.models import TrainSpec

# bytes per frozen weight; NF4: 4 bits, plus a block's fp32 scale per 64 weights (double quantization
# shrinks the scales further): an estimate that counts every frozen weight as quantized, though the
# embeddings and norms stay unquantized
NF4_BYTES = 0.5 + 4 / 64
BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "nf4-bf16": NF4_BYTES, "nf4-fp32": NF4_BYTES}
MIB = 1 << 20


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    cpu_fast_bf16: bool  # AVX512-BF16 or AMX: bf16 matrix products run natively
    torch: str
    gpu: str | None = None
    gpu_memory_mib: int | None = None
    gpu_bf16: bool | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes
                + self.logits_bytes)

    def to_dict(self) -> dict[str, int]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "total_bytes": self.total_bytes}


@dataclass
class Diagnosis:
    machine: Machine
    device: str | None = None
    precision: str | None = None
    precision_why: str | None = None
    base_dtype: str | None = None
    attention: str | None = None
    method: str | None = None
    memory: MemoryEstimate | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"machine": self.machine.__dict__, "device": self.device, "precision": self.precision,
                "precision_why": self.precision_why, "base_dtype": self.base_dtype, "attention": self.attention,
                "method": self.method, "memory": self.memory.to_dict() if self.memory else None, "notes": self.notes}


def machine() -> Machine:
    import torch

    gpu = memory = bf16 = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, memory, bf16 = props.name, props.total_memory // MIB, torch.cuda.is_bf16_supported()
    return Machine(_cpu_name(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                   cpu_has_fast_bf16(), torch.__version__, gpu, memory, bf16)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def diagnose(loaded: LoadedSpec | None, models_dir: Path) -> Diagnosis:
    """The machine, and with a spec what its training will use and need."""
    found = Diagnosis(machine())
    if loaded is None:
        return found
    train = loaded.spec.train
    compute = Compute.resolve(train.precision, train.method)
    found.device, found.precision, found.base_dtype, found.method = (compute.device, compute.precision,
                                                                     compute.base_dtype, train.method)
    found.precision_why = _why(train.precision, compute, found.machine)
    attention = training_attention(compute.device, train.seq_len)
    found.attention = ("eager (measured faster than PyTorch's CPU flash attention for short rows)"
                       if attention == "eager" else "sdpa (PyTorch scaled dot-product attention)")
    source = resolve_model_source(loaded.spec.model, loaded.base_dir)
    found.memory = estimate(model_dir_for(source, models_dir), train, compute,
                            classifier_labels=_label_count(loaded) if loaded.spec.task.head == "classifier" else 0)
    if train.packs:
        found.notes.append("packing: each micro-batch's examples are packed into rows, attention kept inside "
                           "each example (after the batch's shared prefix, when it has one); random batches")
    if train.method in PROMPT_LEARNING:
        found.notes.append(f"{train.method} tuning: the virtual tokens lengthen every row; the estimate counts them")
    if found.machine.gpu is None:
        found.notes.append("no CUDA GPU: training runs on the CPU")
    return found


def _why(requested: str, compute: Compute, m: Machine) -> str:
    if requested != "auto":
        return f"train.precision: {requested}"
    if compute.device.startswith("cuda"):
        return "auto: the GPU supports bf16" if compute.precision == "bf16" else "auto: the GPU has no bf16"
    if compute.precision == "bf16":
        return "auto: the CPU multiplies bf16 natively (AVX512-BF16/AMX)"
    return "auto: the CPU has no native bf16 (no AVX512-BF16 or AMX), where bf16 would be slower than fp32"


def _label_count(loaded: LoadedSpec) -> int:
    return len(loaded.spec.task.labels or []) or 2  # inferred from the rows when not listed: at least two


def estimate(model_dir: str | Path, train: TrainSpec, compute: Compute, classifier_labels: int = 0) -> MemoryEstimate:
    """One training step's memory for ``train`` on the model at ``model_dir``: parameters counted on
    the meta device, activations and logits estimated from the shapes (see the module docstring)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = _meta_model(config, train, classifier_labels)
    frozen_bytes, trainable, total = BYTES[compute.base_dtype], 0, 0
    weights = 0.0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            weights += p.numel() * (4 if p.dtype == torch.float32 or train.method == "full" else frozen_bytes)
        else:
            weights += p.numel() * frozen_bytes
    rows = train.batch_size
    tokens = train.seq_len + (train.prompt.virtual_tokens if train.method in PROMPT_LEARNING else 0)
    act_bytes = BYTES[compute.precision]
    vocab = classifier_labels or int(config.vocab_size)
    logit_positions = rows if classifier_labels else rows * tokens
    eager = training_attention(compute.device, train.seq_len) == "eager"
    activations = _activations(config, rows, tokens, train.gradient_checkpointing, probabilities=eager)
    return MemoryEstimate(total, trainable, round(weights), trainable * 4, trainable * 8,
                          round(activations * act_bytes), 2 * logit_positions * vocab * 4)


def _meta_model(config: PretrainedConfig, train: TrainSpec, classifier_labels: int) -> nn.Module:
    """The model with the spec's adapter, its parameters on the meta device (shapes only)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        if classifier_labels:
            head = classifier_from_causal_lm(base, [f"label{i}" for i in range(classifier_labels)],
                                             config.pad_token_id)
            return wrap_classifier(head, train)
        no_fuse = train.model_copy(update={"fused_lora": False, "compile": False, "gradient_checkpointing": False})
        return wrap_for_training(base, no_fuse)  # the same trainable parameters: fusing changes kernels only


def _activations(config: PretrainedConfig, rows: int, tokens: int, checkpointing: bool, probabilities: bool) -> int:
    """Elements a decoder keeps for the backward pass of one micro-batch: per layer the inputs of its
    norms and projections (q, k, v, o; gate, up, down), the attention probabilities with
    ``probabilities`` (the eager attention the CPU trains with; on a GPU, SDPA's fused kernels keep
    only a row statistic), the MLP's intermediate products; under checkpointing each layer's input
    plus one layer recomputed."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * (hidden // heads)
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    layers = int(config.num_hidden_layers)
    per_layer = rows * tokens * (6 * hidden + 2 * kv + 4 * inter) + rows * heads * tokens * (tokens if probabilities else 1)
    if checkpointing:
        return layers * rows * tokens * hidden + per_layer
    return layers * per_layer
