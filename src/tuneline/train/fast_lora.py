"""A fused forward and backward for plain LoRA linears: the training hot path.

peft's LoRA ``Linear.forward`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` after
casting ``x`` to the adapter's dtype. With a bf16 base and fp32 adapters that costs, in every one
of the model's 210 adapted linears, a full-size copy of the activations to fp32 and back, a
scaling multiply and an add over the output, and the same again in the backward pass; measured on
a 2-core CPU that element-wise work took about 40% of a training step.

:class:`LoraLinearFunction` computes the same thing with the scaling folded into the small ``B``
matrix and the adapter product accumulated into the base output in place (``addmm``), in the base
weight's dtype, and writes fp32 gradients for the fp32 adapter weights. peft still owns the
modules, their configuration and saving; :func:`install` only swaps the forward of the modules it
can compute exactly (one active adapter, no dropout, no DoRA or other variant, not merged, a plain
``nn.Linear`` base) and leaves every other case to peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any

_MARK = "_tuneline_fast_lora"


def _function() -> Any:
    import torch

    class LoraLinearFunction(torch.autograd.Function):
        """y = x W^T + b + scale * (x A^T) B^T, computed in W's dtype; grads for x, A, B."""

        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, lora_a: Any, lora_b: Any, scale: float) -> Any:
            dtype = weight.dtype
            with torch.autocast(device_type=x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                a = lora_a.to(dtype)
                b = (lora_b * scale).to(dtype)
                xa = x2 @ a.t()
                y = torch.nn.functional.linear(x2, weight, bias)
                y.addmm_(xa, b.t())
            ctx.save_for_backward(x2, weight, a, b, xa)
            ctx.scale = scale
            ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
            ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x2, weight, a, b, xa = ctx.saved_tensors
            with torch.autocast(device_type=grad.device.type, enabled=False):
                g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
                gb = g @ b  # gradient w.r.t. xa (scale already folded into b)
                grad_x = grad_a = grad_b = None
                if ctx.needs_input_grad[0]:
                    grad_x = (g @ weight).addmm_(gb, a).view(ctx.x_shape).to(ctx.x_dtype)
                if ctx.needs_input_grad[3]:
                    grad_a = (gb.t() @ x2).to(ctx.a_dtype)
                if ctx.needs_input_grad[4]:
                    grad_b = (g.t() @ xa).to(ctx.b_dtype).mul_(ctx.scale)
            return grad_x, None, None, grad_a, grad_b, None

    return LoraLinearFunction


_FN: Any = None


def lora_linear(x: Any, weight: Any, bias: Any, lora_a: Any, lora_b: Any, scale: float) -> Any:
    """``x W^T + b + scale * x A^T B^T`` with the fused backward (the frozen W, b get no gradient)."""
    global _FN
    if _FN is None:
        _FN = _function()
    return _FN.apply(x, weight, bias, lora_a, lora_b, scale)


def _fast_path_ok(module: Any) -> str | None:
    """The single adapter name if ``module`` can use the fused path right now, else None."""
    import torch

    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    if getattr(module, "lora_bias", {}).get(name, False) or module.lora_B[name].bias is not None:
        return None
    if type(module.get_base_layer()) is not torch.nn.Linear:
        return None
    return str(name)


def _fast_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    name = None if (args or kwargs) else _fast_path_ok(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own forward
    base = self.get_base_layer()
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       float(self.scaling[name]))


def install(model: Any) -> int:
    """Use the fused forward in every peft LoRA ``Linear`` of ``model``; return how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, _MARK):
            setattr(module, _MARK, True)
            module.forward = types.MethodType(_fast_forward, module)  # type: ignore[method-assign]
            n += 1
    return n


def uninstall(model: Any) -> int:
    """Restore peft's own forward everywhere :func:`install` replaced it; return how many."""
    n = 0
    for module in model.modules():
        if hasattr(module, _MARK):
            del module.forward
            delattr(module, _MARK)
            n += 1
    return n
