"""Load a base model and tokenizer from any :class:`ModelSource`, caching GGUF conversions."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.artifacts import file_lock, recover_dir, replace_dir
from tuneline.errors import ModelError, Problem
from tuneline.models.sources import ModelSource

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF model is already dequantized by transformers; drop the marker that blocks save/train."""
    # attributes transformers' loader sets and reads with getattr; PreTrainedModel does not declare them
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file three times to convert it (tokenizer, config, weights),
    each parse reading its 49k-entry vocabulary field by field (about 10 s here), and rebuilds
    gguf's tensor-name table once per module (~400 times, 26 ms each): within this block one
    parsed reader per file and one table per (architecture, layers) serve every call. The readers
    are read-only memory maps, so sharing them changes nothing that is read (the same files, byte for
    byte): the built-in model converted in 17 s instead of 41 s here."""
    import gguf  # lazy: only a GGUF conversion needs it

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], gguf.GGUFReader] = {}

    def read_once(path: str | os.PathLike[str], mode: str = "r") -> gguf.GGUFReader:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = read_once  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]


def converted_dir(source: ModelSource, cache_root: Path) -> Path:
    """Cache folder for a GGUF source, keyed by the file's hash so a changed file is re-converted."""
    assert source.path is not None
    digest = source.fingerprint().split(":", 1)[1][:16]
    return cache_root / f"{source.path.stem}-{digest}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def ensure_converted(source: ModelSource, cache_root: Path) -> Path:
    """Dequantize a GGUF once into safetensors under ``cache_root``; return that directory."""
    target = converted_dir(source, cache_root)
    # one conversion at a time per model (two search workers, or test processes, starting together):
    # the second waits and finds it done
    with file_lock(target.with_name(target.name + ".lock")):
        return _convert(source, target)


def _convert(source: ModelSource, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recover_dir(target)
    if _complete(target):
        return target
    assert source.path is not None
    log.info("converting %s to safetensors (once; cached in %s)", source.path.name, target)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = {"gguf_file": source.path.name}
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(source.path.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(source.path.parent, **kw)
    except Exception as exc:  # transformers raises many types here
        raise ModelError(Problem(f"cannot load GGUF {source.path}: {exc}", field="model",
                                 hint="is the `gguf` package installed and the architecture supported by transformers?")) from exc
    _strip_gguf_quantizer(model)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    replace_dir(tmp, target)  # fsynced, so a crash never leaves a partial conversion in the cache
    log.info("converted in %.1fs", time.perf_counter() - t0)
    return target


def model_dir_for(source: ModelSource, cache_root: Path) -> str | Path:
    """What to pass to ``from_pretrained``: a directory, or a hub id."""
    if source.is_gguf:
        return ensure_converted(source, cache_root)
    if source.kind == "local":
        assert source.path is not None
        return source.path
    return source.ref


def load_tokenizer(source: ModelSource, cache_root: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    where = model_dir_for(source, cache_root)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except OSError as exc:
        raise ModelError(Problem(f"cannot load tokenizer for {source.ref!r}: {exc}", field="model",
                                 hint="a hub id needs network access; use a local directory or the built-in model offline")) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise ModelError(Problem(f"model {source.ref!r} has no chat template", field="model",
                                 hint="use an instruct/chat model, or a directory whose tokenizer_config.json has one"))
    return tok


# Rows of at least this many tokens (train.seq_len) train with PyTorch's SDPA on the CPU instead of
# the eager attention: measured here (bench/train_memory.py, AMD EPYC, fp32, batches of 16) at 350
# tokens 230 against 199 tokens/s with a peak of 10.9 against 13.7 GB; at 170 tokens 262 against
# 254 tokens/s and 6.0 against 7.3 GB; at 50 tokens within 3%.
CPU_SDPA_FROM_TOKENS = 256


def training_attention(device: str, seq_len: int) -> str:
    """The attention a model trains with: eager on the CPU for short rows (see :func:`load_model`),
    SDPA for rows of :data:`CPU_SDPA_FROM_TOKENS` tokens or more and on a GPU."""
    return "eager" if device == "cpu" and seq_len < CPU_SDPA_FROM_TOKENS else "sdpa"


def load_model(source: ModelSource, cache_root: Path, device: str = "cpu", dtype: str = "fp32") -> PreTrainedModel:
    """The base causal LM on ``device`` with weights in ``dtype`` ('fp32', 'bf16', or 'nf4-bf16' /
    'nf4-fp32': the linear layers' weights quantized to 4-bit NormalFloat with bitsandbytes, double
    quantization, computed in bf16 / fp32; the rest in that dtype: QLoRA's base).

    For LoRA the frozen base weights can be bf16 (no per-step casts under autocast); trainable
    adapter weights are kept fp32 by the trainer. On CPU the eager attention is used: for short
    training rows its backward measured ~1.4x faster here than PyTorch's CPU flash-attention path.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    where = model_dir_for(source, cache_root)
    attn = "eager" if device == "cpu" else "sdpa"
    quantized = dtype.startswith("nf4")
    torch_dtype = torch.bfloat16 if dtype.removeprefix("nf4-") == "bf16" else torch.float32
    options: dict[str, object] = {}
    if quantized:
        from transformers import BitsAndBytesConfig

        options = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype), "device_map": {"": device}}  # quantized where it is loaded
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, attn_implementation=attn,
                                                                      **options)
    except OSError as exc:
        raise ModelError(Problem(f"cannot load model {source.ref!r}: {exc}", field="model",
                                 hint="a hub id needs network access; use a local directory or the built-in model offline")) from exc
    # a module moves in place (``to`` returns the model itself); through nn.Module's type, because
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which hides its binding
    module: nn.Module = model
    if not quantized:  # a quantized model is placed by device_map (bitsandbytes refuses .to)
        module.to(device)
    return model


@contextmanager
def inference_attention(model: nn.Module) -> Iterator[None]:
    """Generate with PyTorch's scaled-dot-product attention, whatever the model trains with.

    On CPU the model is loaded with the eager attention (faster backward for short training rows),
    but for generation SDPA measured 1.1x (40-token prompts), 1.8x (156) and 2.4x (592) faster on
    this CPU, with the same greedy answers but for bf16 near-ties (``bench/generate_attention.py``).
    The model's own setting is restored on exit."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if before != "eager" or switch is None:
        yield
        return
    try:
        switch("sdpa")
    except (ValueError, ImportError, AttributeError):  # a model without an SDPA path keeps eager
        yield
        return
    try:
        yield
    finally:
        switch(before)
