"""Batched multi-adapter LoRA for serving: every row of a batch through its own adapter in two
batched products per layer, however many adapters the batch mixes.

peft's mixed-adapter batches (``adapter_names=``) loop over the adapters present in a batch at
every LoRA layer and run each one's products on its rows: with 8 adapters that is 8x the small
products of one adapter, and on CPU those dominate decoding (measured by
``bench/serve_throughput.py``: 8 mixed adapters kept 0.25 of one adapter's throughput). Here the
A and B matrices of all loaded adapters are stacked once per layer (``[adapters + 1, r, in]`` and
``[adapters + 1, out, r]``; the last slot is zeros: the base model), each row gathers its own and
``torch.bmm`` does the rest: ``y = base(x) + s[i] * (x A[i]^T) B[i]^T``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear


class MultiLora:
    """Patches the LoRA linears of a peft model; ``rows`` selects each batch row's adapter."""

    def __init__(self, peft_model: PeftModel) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self.model = peft_model
        self.layers: list[LoraLinear] = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
        self.names: list[str] = []
        self.index: torch.Tensor | None = None  # LongTensor [batch]: adapter slot per row (len(names): the base model)
        # per layer: the stacked A and scaled B of every adapter, set by rebuild
        self.stacks: dict[LoraLinear, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            layer.forward = self._forward_of(layer)  # type: ignore[method-assign]

    def rebuild(self, names: list[str]) -> None:
        """Stack the adapters ``names`` (in this order) in every layer; call after loading one."""
        import torch

        self.names = list(names)
        for patched in self.layers:
            layer: Any = patched  # peft's attributes are nn.Module.__getattr__ to mypy: Tensor | Module
            weight: torch.Tensor = layer.base_layer.weight
            have = [n for n in self.names if n in layer.lora_A]
            r = max((layer.lora_A[n].weight.shape[0] for n in have), default=1)
            a = torch.zeros(len(self.names) + 1, r, layer.in_features, dtype=weight.dtype, device=weight.device)
            b = torch.zeros(len(self.names) + 1, layer.out_features, r, dtype=weight.dtype, device=weight.device)
            scale = torch.zeros(len(self.names) + 1, 1, 1, dtype=weight.dtype, device=weight.device)
            for i, n in enumerate(self.names):
                if n not in layer.lora_A:
                    continue  # an adapter that does not touch this layer: zeros
                wa, wb = layer.lora_A[n].weight, layer.lora_B[n].weight
                a[i, : wa.shape[0]] = wa.to(weight.dtype)
                b[i, :, : wb.shape[1]] = wb.to(weight.dtype)
                scale[i] = layer.scaling[n]
            self.stacks[patched] = (a, b * scale)

    def slot(self, adapter: str) -> int:
        return self.names.index(adapter) if adapter in self.names else len(self.names)

    def _forward_of(self, layer: LoraLinear) -> Callable[..., torch.Tensor]:
        peft_forward = type(layer).forward

        # args and kwargs: whatever the model passes a linear layer, handed on unchanged
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            import torch

            stack = self.stacks.get(layer)
            if self.index is None or stack is None or x.dim() != 3 or kwargs.get("adapter_names") is not None:
                return peft_forward(layer, x, *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            a, b = stack
            idx = self.index
            h = torch.bmm(x.to(a.dtype), a[idx].transpose(1, 2))
            return result + torch.bmm(h, b[idx].transpose(1, 2)).to(result.dtype)

        return forward


def computes_exactly(peft_model: PeftModel, name: str) -> bool:
    """Whether MultiLora computes the loaded adapter ``name`` exactly: every layer it adapts is a
    LoRA linear without a DoRA magnitude (peft's LoRA embeddings and convolutions, and DoRA, are
    left to peft's own forward, which would apply the active adapter to every row)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        layer: Any = module  # peft's attributes are nn.Module.__getattr__ to mypy
        holds = name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {})
        if holds and (not isinstance(module, LoraLinear) or layer.use_dora.get(name, False)):
            return False
    return True
