"""Where and how tensors are computed: device, precision, autocast, and the few facts about the
installed transformers that several layers need (the KV-cache keyword). No tuneline imports above
``errors``: data, models, training, evaluation and serving all build on it."""

from tuneline.runtime.compute import (
    Compute,
    autocast_for,
    cache_argument_of,
    cpu_has_fast_bf16,
    default_device,
    resolve_precision,
)

__all__ = ["Compute", "autocast_for", "cache_argument_of", "cpu_has_fast_bf16", "default_device",
           "resolve_precision"]
