"""The training methods a spec may name, and the families that decide how each is trained and served."""

from __future__ import annotations

from typing import Literal

TrainMethod = Literal["lora", "dora", "rslora", "qlora", "ia3", "prefix", "prompt", "full", "dpo"]
TRAIN_METHODS: tuple[str, ...] = ("lora", "dora", "rslora", "qlora", "ia3", "prefix", "prompt", "full", "dpo")
# low-rank adapters: trained with the fused LoRA path where it applies, served batched, exported as LoRA
# (dpo: a LoRA adapter trained on the rows, then by preference optimization on the pairs; qlora: a
# LoRA adapter trained on the base quantized to 4 bits, served on the base as it is)
LORA_SHAPED: tuple[str, ...] = ("lora", "dora", "rslora", "qlora", "dpo")
# trained on a base whose frozen weights are quantized (NF4, bitsandbytes); evaluated and served unquantized
QUANTIZED: tuple[str, ...] = ("qlora",)
# virtual tokens before every input: no shared-prefix cache and no packing, served per model
PROMPT_LEARNING: tuple[str, ...] = ("prefix", "prompt")
