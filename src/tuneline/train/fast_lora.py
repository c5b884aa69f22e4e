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

Linears that read the same input (``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` in
Llama-family models) are also computed together: their frozen weights become row blocks of one
matrix (the modules keep them as views, so nothing is copied and peft sees the same parameters),
one product computes all their outputs, one product their adapters' ``x A^T`` (A's stacked) and
one their ``B`` (block-diagonal); the backward is likewise three products for the group instead of
five per linear. The first member called computes the group and hands the others their outputs
when they are called with the same input; any other call pattern computes them one by one.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

_MARK = "_tuneline_fast_lora"
_GROUP = "_tuneline_lora_group"


class _Ctx(Protocol):
    """The part of torch's autograd context both functions use (torch itself types ``ctx`` as ``Any``)."""

    needs_input_grad: tuple[bool, ...]
    x_shape: torch.Size
    x_dtype: torch.dtype

    @property
    def saved_tensors(self) -> tuple[torch.Tensor, ...]: ...

    def save_for_backward(self, *tensors: torch.Tensor) -> None: ...


class _LinearCtx(_Ctx, Protocol):
    """What :class:`LoraLinearFunction` keeps on the context for its backward."""

    scale: float
    a_dtype: torch.dtype
    b_dtype: torch.dtype


class _GroupCtx(_Ctx, Protocol):
    """What :class:`LoraGroupFunction` keeps on the context for its backward."""

    sizes: tuple[int, ...]
    scales: tuple[float, ...]
    ranks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]


def _function() -> type[torch.autograd.Function]:
    import torch

    class LoraLinearFunction(torch.autograd.Function):
        """y = x W^T + b + scale * (x A^T) B^T, computed in W's dtype; grads for x, A, B."""

        @staticmethod
        def forward(ctx: _LinearCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
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
        def backward(ctx: _LinearCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
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


_FN: type[torch.autograd.Function] | None = None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``x W^T + b + scale * x A^T B^T`` with the fused backward (the frozen W, b get no gradient)."""
    global _FN
    if _FN is None:
        _FN = _function()
    return _FN.apply(x, weight, bias, lora_a, lora_b, scale)


def _group_function() -> type[torch.autograd.Function]:
    import torch

    class LoraGroupFunction(torch.autograd.Function):
        """Outputs y_i = x W_i^T + s_i (x A_i^T) B_i^T of linears sharing x, W the stacked W_i."""

        @staticmethod
        def forward(ctx: _GroupCtx, x: torch.Tensor, weight: torch.Tensor, sizes: tuple[int, ...],
                    scales: tuple[float, ...], *adapters: torch.Tensor) -> tuple[torch.Tensor, ...]:
            n = len(sizes)
            lora_as, lora_bs = adapters[:n], adapters[n:]
            dtype = weight.dtype
            with torch.autocast(device_type=x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                a = torch.cat(lora_as).to(dtype)  # (sum of ranks, in)
                b = torch.block_diag(*(lb * s for lb, s in zip(lora_bs, scales, strict=True))).to(dtype)
                xa = x2 @ a.t()
                y = torch.nn.functional.linear(x2, weight)
                y.addmm_(xa, b.t())
            ctx.save_for_backward(x2, weight, a, b, xa)
            ctx.sizes, ctx.scales, ctx.x_shape, ctx.x_dtype = sizes, scales, x.shape, x.dtype
            ctx.ranks = tuple(la.shape[0] for la in lora_as)
            ctx.dtypes = tuple(t.dtype for t in adapters)
            return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in y.split(sizes, dim=1))

        @staticmethod
        def backward(ctx: _GroupCtx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
            x2, weight, a, b, xa = ctx.saved_tensors
            n = len(ctx.sizes)
            with torch.autocast(device_type=x2.device.type, enabled=False):
                g = torch.cat([gr.reshape(-1, size).to(weight.dtype) if gr is not None
                               else x2.new_zeros(x2.shape[0], size)
                               for gr, size in zip(grads, ctx.sizes, strict=True)], dim=1)
                gb = g @ b  # gradient w.r.t. xa (scales already folded into b)
                grad_x = None
                if ctx.needs_input_grad[0]:
                    grad_x = (g @ weight).addmm_(gb, a).view(ctx.x_shape).to(ctx.x_dtype)
                grad_a = (gb.t() @ x2).split(ctx.ranks, dim=0)
                grad_b_all = g.t() @ xa  # only its diagonal blocks are B's gradients
                rows = grad_b_all.split(ctx.sizes, dim=0)
                grad_as: list[torch.Tensor | None] = []
                grad_bs: list[torch.Tensor | None] = []
                for i, (r0, ga) in enumerate(zip(_offsets(ctx.ranks), grad_a, strict=True)):
                    grad_as.append(ga.to(ctx.dtypes[i]) if ctx.needs_input_grad[4 + i] else None)
                    grad_bs.append(rows[i][:, r0 : r0 + ctx.ranks[i]].to(ctx.dtypes[n + i]).mul_(ctx.scales[i])
                                   if ctx.needs_input_grad[4 + n + i] else None)
            return (grad_x, None, None, None, *grad_as, *grad_bs)

    return LoraGroupFunction


def _offsets(sizes: tuple[int, ...]) -> list[int]:
    out, at = [], 0
    for size in sizes:
        out.append(at)
        at += size
    return out


_GROUP_FN: type[torch.autograd.Function] | None = None


def lora_group(x: torch.Tensor, weight: torch.Tensor, lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
               scales: list[float]) -> tuple[torch.Tensor, ...]:
    """The outputs of LoRA linears that share the input ``x``; ``weight`` stacks their base weights."""
    global _GROUP_FN
    if _GROUP_FN is None:
        _GROUP_FN = _group_function()
    sizes = tuple(int(b.shape[0]) for b in lora_bs)
    return _GROUP_FN.apply(x, weight, sizes, tuple(scales), *lora_as, *lora_bs)


# sibling linears that read the same input, by architecture family (Llama, Mistral, Qwen, Gemma, ...)
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """LoRA linears fed the same input, their base weights rows of one stacked matrix."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self.weight: torch.Tensor
        self.pending: dict[int, torch.Tensor] = {}  # member index -> output computed with the group
        self.pending_x: torch.Tensor | None = None
        self.pending_version = -1
        self.stack()

    def stack(self) -> None:
        """Concatenate the members' base weights and make each member's weight a view of its rows."""
        import torch

        weights = [_base(m).weight for m in self.members]
        with torch.no_grad():
            self.weight = torch.cat([w.data for w in weights])
            at = 0
            for w in weights:
                w.data = self.weight[at : at + w.shape[0]]
                at += w.shape[0]
        self.ptrs = [_base(m).weight.data_ptr() for m in self.members]

    def adapter(self) -> str | None:
        """The common adapter name if every member can take the grouped path now, else None."""
        names = {_fast_path_ok(m) for m in self.members}
        if len(names) != 1 or None in names:
            return None
        for m, ptr in zip(self.members, self.ptrs, strict=True):
            base = _base(m)
            if base.bias is not None:
                return None
            if base.weight.data_ptr() != ptr or base.weight.dtype != self.weight.dtype:
                self.stack()  # the weights were replaced (moved, cast, re-loaded): stack them again
                break
        return names.pop()

    def forward(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        i = self.members.index(member)
        if self.pending_x is x and _version(x) == self.pending_version and i in self.pending:
            out = self.pending.pop(i)
            if not self.pending:
                self.pending_x = None
            return out
        name = self.adapter()
        if name is None:
            self.pending, self.pending_x = {}, None
            return None
        outs = lora_group(x, self.weight, [_linear(m.lora_A[name]).weight for m in self.members],
                          [_linear(m.lora_B[name]).weight for m in self.members],
                          [float(m.scaling[name]) for m in self.members])
        self.pending = {j: o for j, o in enumerate(outs) if j != i}
        self.pending_x, self.pending_version = x, _version(x)
        return outs[i]


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place version counter (inference tensors have none and cannot change)."""
    return -1 if x.is_inference() else int(x._version)


def _linear(module: torch.nn.Module) -> torch.nn.Linear:
    """A LoRA ``A`` or ``B`` module, or a base layer :func:`_fast_path_ok` accepted: an ``nn.Linear``
    (peft builds ``lora_A``/``lora_B`` as ``nn.Linear`` but keeps them in an untyped ``ModuleDict``)."""
    return cast("torch.nn.Linear", module)


def _base(module: LoraLinear) -> torch.nn.Linear:
    """The base linear of a LoRA linear the fused path computes (:func:`_fast_path_ok` checked its type)."""
    return _linear(module.get_base_layer())


def _fast_path_ok(module: LoraLinear) -> str | None:
    """The single adapter name if ``module`` can use the fused path right now, else None."""
    import torch

    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    if getattr(module, "lora_bias", {}).get(name, False) or _linear(module.lora_B[name]).bias is not None:
        return None
    if type(module.get_base_layer()) is not torch.nn.Linear:
        return None
    return str(name)


def _fast_forward(self: LoraLinear, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    group: _Group | None = getattr(self, _GROUP, None)
    if group is not None and not (args or kwargs):
        out = group.forward(self, x)
        if out is not None:
            return out
    name = None if (args or kwargs) else _fast_path_ok(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own forward
    base = _base(self)
    return lora_linear(x, base.weight, base.bias, _linear(self.lora_A[name]).weight, _linear(self.lora_B[name]).weight,
                       float(self.scaling[name]))


def install(model: torch.nn.Module, group: bool = True) -> int:
    """Use the fused forward in every peft LoRA ``Linear`` of ``model``; return how many.

    With ``group``, sibling linears that read the same input (:data:`GROUPS`) are computed together."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, _MARK):
            setattr(module, _MARK, True)
            module.forward = types.MethodType(_fast_forward, module)  # type: ignore[method-assign]
            n += 1
    for module in list(model.modules()) if group else ():
        for names in GROUPS:
            found = [getattr(module, name, None) for name in names]
            members = [m for m in found if type(m) is LoraLinear and hasattr(m, _MARK)]
            if len(members) > 1 and not any(hasattr(m, _GROUP) for m in members):
                shared = _Group(members)
                for m in members:
                    setattr(m, _GROUP, shared)
    return n


def uninstall(model: torch.nn.Module) -> int:
    """Restore peft's own forward everywhere :func:`install` replaced it; return how many."""
    n = 0
    for module in model.modules():
        if hasattr(module, _MARK):
            del module.forward
            delattr(module, _MARK)
            n += 1
        if hasattr(module, _GROUP):
            delattr(module, _GROUP)  # the weights stay views of the stacked matrix: same values
    return n
