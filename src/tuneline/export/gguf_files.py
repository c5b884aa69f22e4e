"""``--format gguf``: the merged model as one GGUF file (``--gguf-kind merged``), or the LoRA
adapter as a llama.cpp LoRA GGUF against the base's GGUF (``--gguf-kind lora``), written with the
``gguf`` package in llama.cpp's layout (names, metadata, q/k row order: :mod:`.gguf_common`).

A LoRA GGUF holds, per adapted weight ``blk.N.attn_q.weight``, the tensors ``….lora_a`` (rank x
inputs) and ``….lora_b`` (outputs x rank), with ``general.type = adapter``, ``adapter.type = lora``
and ``adapter.lora.alpha``: llama.cpp scales each product by alpha / rank, the rank read from the
tensors. rsLoRA scales by alpha / sqrt(rank): its alpha is written as alpha * sqrt(rank).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tuneline.artifacts import ADAPTER_SHA_TAG
from tuneline.errors import Problem
from tuneline.export.gguf_common import (
    ARCH,
    LlamaShape,
    base_gguf,
    gguf_name,
    interleave_rotary,
    rotary_heads,
    write_tokenizer,
)
from tuneline.export.source import ExportError, Fetched, base_model_dir, base_source

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGUFWriter
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneline.workspace import Workspace

GgufDtype = Literal["f32", "f16"]
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
PEFT_PREFIX = "base_model.model."
SOURCE_KEY = "tuneline.source"  # NAME/VERSION the file was exported from
ADAPTER_KEY = "tuneline.adapter_sha256"  # the verified adapter's tree hash


def write_model_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, fetched: Fetched, *,
                     dtype: GgufDtype = "f16") -> list[str]:
    """The whole model (merged) as a llama GGUF file; 1-D tensors (norms) stay f32 as llama.cpp keeps them."""
    import gguf  # lazy: gguf loads numpy and llama.cpp's tables, only for a GGUF export
    import numpy as np

    shape = LlamaShape.of(model.config)
    notes: list[str] = []
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    _provenance(writer, fetched, fetched.ref)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    shape.write(writer)
    write_tokenizer(writer, tokenizer, notes)
    for hf_name, tensor in model.state_dict().items():
        if shape.tied and hf_name == "lm_head.weight":
            continue  # tied to token_embd: llama.cpp reuses it when output.weight is absent
        data = tensor.detach().float().numpy()
        if (heads := rotary_heads(hf_name, shape)) is not None:
            data = interleave_rotary(data, heads)
        writer.add_tensor(gguf_name(hf_name, shape.blocks),
                          data.astype(np.float16) if dtype == "f16" and data.ndim > 1 else data)
    _finish(writer)
    return notes


def write_lora_gguf(fetched: Fetched, ws: Workspace, path: Path, *, base: str | None = None,
                    dtype: GgufDtype = "f32") -> list[str]:
    """The LoRA adapter as a llama.cpp LoRA GGUF; each adapted tensor checked against the base
    GGUF's own tensor of that name and shape when the base is a GGUF (the built-in model)."""
    import gguf  # lazy: gguf loads numpy and llama.cpp's tables, only for a GGUF export
    from transformers import AutoConfig

    rank, alpha = _lora_scaling(fetched)
    source = base_source(fetched, base)
    shape = LlamaShape.of(AutoConfig.from_pretrained(base_model_dir(source, ws)))
    against = base_gguf(source)
    base_shapes = _tensor_shapes(against) if against is not None else None
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    _provenance(writer, fetched, f"{fetched.ref} LoRA")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for hf_name, (a, b) in _lora_pairs(fetched).items():
        name = gguf_name(hf_name, shape.blocks)
        if (heads := rotary_heads(hf_name, shape)) is not None:
            b = interleave_rotary(b, heads)
        if base_shapes is not None and base_shapes.get(name) != (a.shape[1], b.shape[0]):
            raise ExportError(Problem(
                f"the adapter's {hf_name} ({b.shape[0]}x{a.shape[1]}) has no tensor {name} of that shape in {against}",
                field="--base", hint="export against the GGUF of the base it was trained on"))
        writer.add_tensor(f"{name}.lora_a", a.astype(dtype_of(dtype)))
        writer.add_tensor(f"{name}.lora_b", b.astype(dtype_of(dtype)))
    _finish(writer)
    if against is None:
        return [f"the base {source.ref!r} is not a GGUF file: load this adapter in llama.cpp over a GGUF of "
                f"{source.portable_name} (e.g. converted with llama.cpp's convert_hf_to_gguf.py)"]
    return [f"rank {rank}, alpha {alpha:g}; for llama.cpp: --model {against} --lora {path}"]


def dtype_of(dtype: GgufDtype) -> type[np.floating]:
    import numpy as np

    return np.float16 if dtype == "f16" else np.float32


def _lora_scaling(fetched: Fetched) -> tuple[int, float]:
    """(rank, the alpha llama.cpp needs): refused for what llama.cpp's LoRA cannot express."""
    method, config = fetched.method, fetched.adapter_config
    if method not in ("lora", "rslora"):
        also = "--format gguf (merged), merged, mlflow or peft" if method in ("dora", "ia3", "full") else "--format peft"
        raise ExportError(Problem(f"{fetched.ref} is a {method} model: only LoRA and rsLoRA adapters export as a "
                                  "LoRA GGUF (llama.cpp applies plain low-rank products)", field="--gguf-kind",
                                  hint=f"use {also}"))
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise ExportError(Problem(f"adapter_config.json has {key}: a LoRA GGUF holds one alpha and LoRA "
                                      "tensors only", field="--gguf-kind", hint="use --gguf-kind merged"))
    if config.get("bias", "none") != "none":
        raise ExportError(Problem("the adapter trains biases, which a LoRA GGUF cannot hold", field="--gguf-kind",
                                  hint="use --gguf-kind merged"))
    rank, alpha = int(str(config["r"])), float(str(config["lora_alpha"]))
    return rank, alpha * math.sqrt(rank) if method == "rslora" else alpha


def _lora_pairs(fetched: Fetched) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Hugging Face weight name -> (A, B) as fp32 arrays, from the adapter's safetensors."""
    from safetensors.torch import load_file

    weights = load_file(str(fetched.folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in weights.items():
        stem = key.removeprefix(PEFT_PREFIX)
        which = "A" if stem.endswith(LORA_A) else "B" if stem.endswith(LORA_B) else None
        if which is None:
            raise ExportError(Problem(f"adapter tensor {key!r} is not a LoRA A or B matrix", field="--gguf-kind",
                                      hint="use --gguf-kind merged"))
        base_name = stem.removesuffix(LORA_A if which == "A" else LORA_B) + ".weight"
        pairs.setdefault(base_name, {})[which] = tensor.float().numpy()
    return {name: (ab["A"], ab["B"]) for name, ab in sorted(pairs.items())}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """A GGUF's 2-D tensors: name -> (ne0, ne1) = (inputs, outputs)."""
    from gguf import GGUFReader  # lazy: as gguf above

    return {t.name: (int(t.shape[0]), int(t.shape[1])) for t in GGUFReader(path).tensors if len(t.shape) == 2}


def _provenance(writer: GGUFWriter, fetched: Fetched, name: str) -> None:
    """general.name, and what the file was made from (the version, its verified adapter hash)."""
    writer.add_name(name)
    writer.add_string(SOURCE_KEY, f"{fetched.info.name}/{fetched.info.version}")
    writer.add_string(ADAPTER_KEY, fetched.info.tags.get(ADAPTER_SHA_TAG, ""))
    if base := fetched.base_record.get("base_model_name_or_path"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
