"""What the two GGUF exports share: llama.cpp's tensor names for the llama architecture, the q/k
row order llama.cpp's llama attention expects, and the tokenizer as GGUF metadata.

Tensor names come from the ``gguf`` package's own map (``gguf.get_tensor_name_map``), e.g.
``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``. Hugging Face's llama
splits each head's rotary dimensions in two halves; llama.cpp's llama kernel pairs them
interleaved, so the rows of ``attn_q`` / ``attn_k`` are reordered per head (for a LoRA adapter,
the rows of its B matrix: those are the rows of B @ A). Reading the GGUF back, transformers
undoes exactly this reordering.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.errors import Problem
from tuneline.export.source import ExportError
from tuneline.models.sources import ModelSource

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGUFWriter
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

ARCH = "llama"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types
# llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) by vocabulary (:func:`vocabulary_sha256`), as the
# GGUF files tuneline ships write it (reading a GGUF's 49k-token metadata takes seconds, so not at export;
# tests/integration/test_export.py checks the entry against the built-in model's file)
KNOWN_PRE_TOKENIZERS = {
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",  # SmolLM2 (built-in smollm2-135m)
}


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters llama.cpp reads for the llama architecture."""

    blocks: int
    context: int
    embedding: int
    feed_forward: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: PretrainedConfig) -> LlamaShape:
        archs = list(getattr(config, "architectures", None) or [])
        if not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ExportError(Problem(f"GGUF export supports the llama architecture only, not {archs or '?'}",
                                      field="--format", hint="export --format merged or peft instead"))
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ExportError(Problem(f"GGUF export does not write rope scaling ({rope.get('rope_type')!r})",
                                      field="--format", hint="export --format merged or peft instead"))
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        return cls(blocks=int(config.num_hidden_layers), context=int(config.max_position_embeddings),
                   embedding=hidden, feed_forward=int(config.intermediate_size), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
                   rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
                   rms_eps=float(config.rms_norm_eps), vocab=int(config.vocab_size),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def write(self, writer: GGUFWriter) -> None:
        writer.add_block_count(self.blocks)
        writer.add_context_length(self.context)
        writer.add_embedding_length(self.embedding)
        writer.add_feed_forward_length(self.feed_forward)
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_vocab_size(self.vocab)
        writer.add_rope_dimension_count(self.head_dim)


def gguf_name(hf_name: str, blocks: int) -> str:
    """llama.cpp's name of a Hugging Face llama tensor (``...q_proj.weight`` -> ``blk.N.attn_q.weight``)."""
    import gguf  # lazy: gguf loads numpy and llama.cpp's tables, only for a GGUF export

    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExportError(Problem(f"no llama.cpp tensor name for {hf_name!r}", field="--format",
                                  hint="GGUF export covers the llama architecture's own tensors"))
    return mapped


def interleave_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a q or k projection (``heads``: its own head count, the kv heads
    for k) from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rotary_heads(hf_name: str, shape: LlamaShape) -> int | None:
    """The head count to reorder a tensor's rows by: q and k projections only."""
    if ".q_proj." in hf_name:
        return shape.heads
    if ".k_proj." in hf_name:
        return shape.kv_heads
    return None


# --- the tokenizer --------------------------------------------------------------------------------

def write_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, notes: list[str]) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer: tokens by id, their types
    (added special tokens are control tokens), merges, special ids and the chat template.
    ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name) is taken from a GGUF tuneline knows
    with the same vocabulary (the built-in model's), else ``default`` with a note."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(Problem(f"GGUF export writes byte-level BPE tokenizers, not {model.get('type')!r}",
                                  field="--format", hint="export --format merged instead"))
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokens, notes))
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if isinstance(template := getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(template)


def vocabulary_sha256(tokens: list[str]) -> str:
    """The identity of a vocabulary: its tokens in id order."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def _pre_tokenizer(tokens: list[str], notes: list[str]) -> str:
    known = KNOWN_PRE_TOKENIZERS.get(vocabulary_sha256(tokens))
    if known is not None:
        return known
    notes.append("the vocabulary is not one tuneline knows a llama.cpp pre-tokenizer name for: wrote "
                 "tokenizer.ggml.pre = 'default'; llama.cpp may split text differently than transformers")
    return "default"


def base_gguf(source: ModelSource) -> Path | None:
    """The base's own GGUF file, when the base is one (the built-in model, a .gguf spec model)."""
    return source.path if source.is_gguf else None
