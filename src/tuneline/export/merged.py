"""``--format merged``: the adapter merged into its base (peft's ``merge_and_unload``) and saved as
safetensors with the tokenizer and chat template, so ``AutoModelForCausalLM.from_pretrained(folder)``
loads it without peft. A full fine-tune is already a whole model: it is saved as itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tuneline.eval.generate import DECODING_FILE
from tuneline.export.peft_folder import write_record
from tuneline.export.source import Fetched, base_source, load_base, require_mergeable, tokenizer_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneline.models.sources import ModelSource
    from tuneline.workspace import Workspace

SaveDtype = Literal["fp32", "bf16"]


def merged_model(fetched: Fetched, ws: Workspace, fmt: str, base: str | None = None
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The version as one fp32 model (adapter merged into the verified base) and its tokenizer."""
    require_mergeable(fetched, fmt)
    source = None if fetched.method == "full" else base_source(fetched, base)
    return merge_folder(fetched.folder, fetched.method, source, ws)


def merge_folder(folder: Path, method: str, source: ModelSource | None, ws: Workspace
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An adapter folder of a mergeable method merged into ``source`` (already verified), or a full
    fine-tune's folder loaded as itself (``source`` None), in fp32, with its tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(folder)
    if source is None:
        raise ValueError(f"a {method} adapter needs its base model")
    peft_model = PeftModel.from_pretrained(load_base(source, ws), str(folder))
    merged: PreTrainedModel = peft_model.merge_and_unload()
    return merged, tokenizer_of(folder, source, ws)


def export_merged(fetched: Fetched, ws: Workspace, out: Path, *, base: str | None = None,
                  dtype: SaveDtype = "fp32") -> list[str]:
    """Write the merged model into ``out``; return notes for the user."""
    model, tokenizer = merged_model(fetched, ws, "merged", base)
    save_merged(model, tokenizer, out, fetched, dtype)
    return [f"weights in {dtype}; AutoModelForCausalLM.from_pretrained(folder) loads it, no peft needed"]


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, fetched: Fetched,
                dtype: SaveDtype) -> None:
    """safetensors weights, config, generation config (the version's decoding settings), tokenizer
    with its chat template, and export.json."""
    import torch

    if dtype == "bf16":
        module: torch.nn.Module = model  # moves in place; through nn.Module's type (see models.loading.load_model)
        module.to(torch.bfloat16)
    decoding_defaults(model, fetched.folder, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_record(out, fetched, "merged", {"dtype": dtype})


def decoding_defaults(model: PreTrainedModel, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The generation config answers as the version was evaluated and is served: greedy (or beams),
    its max_new_tokens and repetition settings from decoding.json."""
    config = model.generation_config
    config.do_sample = False
    config.temperature, config.top_p, config.top_k = None, None, None
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    path = folder / DECODING_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    for key in ("max_new_tokens", "num_beams", "repetition_penalty", "no_repeat_ngram_size"):
        if key in saved:
            setattr(config, key, saved[key])
