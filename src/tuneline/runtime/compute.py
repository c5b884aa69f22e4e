"""Pick the device and compute precision (bf16 where the hardware runs it fast, fp32 elsewhere),
and the dtype of the frozen base weights."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from tuneline.spec.methods import QUANTIZED


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True if the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_precision(requested: str, device: str) -> str:
    """'bf16' or 'fp32' for ``requested`` in {auto, bf16, fp32} on ``device``."""
    import torch

    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_for(precision: str, device: str) -> AbstractContextManager[object]:
    """The autocast context that computes in ``precision`` on ``device`` (a no-op for fp32; the value
    ``with`` binds is of no use)."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


@functools.cache
def cache_argument_of(forward: Callable[..., object]) -> str:
    """The keyword a decoder's ``forward`` takes for a KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values``; looked up once per function (the training loss asks in every step)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Compute:
    """Where a run computes: the device, the compute precision, and the dtype of the base weights
    training loads (bf16 for adapter methods when computing in bf16; full fine-tuning keeps fp32
    master weights; qlora: ``nf4-<precision>``, 4-bit NormalFloat weights computed in the precision)."""

    device: str
    precision: str
    base_dtype: str

    @classmethod
    def resolve(cls, requested_precision: str, method: str, device: str | None = None) -> Compute:
        """The compute for a training config's ``precision`` and ``method`` on ``device`` (default:
        CUDA when available, else CPU)."""
        device = device or default_device()
        precision = resolve_precision(requested_precision, device)
        if method in QUANTIZED:
            return cls(device, precision, f"nf4-{precision}")
        return cls(device, precision, "bf16" if precision == "bf16" and method != "full" else "fp32")

    @property
    def served_dtype(self) -> str:
        """The dtype of the base as it is evaluated and served: the training's, but unquantized."""
        return self.precision if self.base_dtype.startswith("nf4") else self.base_dtype

    def autocast(self) -> AbstractContextManager[object]:
        return autocast_for(self.precision, self.device)
