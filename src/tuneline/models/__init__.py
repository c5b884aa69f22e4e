"""Base models: resolve a spec's ``model`` string, load model and tokenizer, cache conversions."""

from tuneline.models.loading import ensure_converted, load_model, load_tokenizer
from tuneline.models.sources import BUILTIN_MODELS, ModelSource, resolve_model_source

__all__ = [
    "BUILTIN_MODELS",
    "ModelSource",
    "ensure_converted",
    "load_model",
    "load_tokenizer",
    "resolve_model_source",
]
