"""Pick the compute precision: bf16 where the hardware runs it fast, fp32 elsewhere."""

from __future__ import annotations

import functools
from pathlib import Path


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
