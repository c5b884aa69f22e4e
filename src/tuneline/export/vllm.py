"""What vLLM's LoRA loader will refuse in an adapter folder, found before a team deploys it.

From vLLM's own code and docs (``vllm.config.lora.LoRAConfig``, ``vllm.lora.peft_helper.PEFTHelper``):
``--max-lora-rank`` defaults to 16 and takes 1, 8, 16, 32, 64, 128, 256, 320 or 512 (recent
versions); an adapter of higher rank is refused. ``modules_to_save``, DoRA and biases other than
``none`` are refused. Only LoRA adapters load (IA3, prefix and prompt tuning do not). For the
llama family, vLLM applies LoRA to the attention and MLP projections (packed as ``qkv_proj`` and
``gate_up_proj``); recent versions removed LoRA on ``embed_tokens`` / ``lm_head`` (the extra-vocab
support went in v0.12), and any other module name is refused as unexpected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneline.export.source import ADAPTER_CONFIG, method_of

VLLM_DEFAULT_MAX_RANK = 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values --max-lora-rank accepts
VLLM_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})


@dataclass(frozen=True)
class Finding:
    """One thing vLLM's LoRA loader refuses (``refused``) or needs told (``--max-lora-rank``)."""

    what: str
    fix: str
    refused: bool = True


def check_vllm(folder: Path, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> list[Finding]:
    """The findings for an adapter folder (empty: vLLM loads it with ``--max-lora-rank
    max_lora_rank``). ``max_lora_rank``: what the vLLM server is (or will be) started with."""
    method = method_of(folder)
    if method not in ("lora", "rslora", "dora"):
        return [Finding(f"vLLM serves LoRA adapters only; this is {method}",
                        "serve the merged model instead: `tuneline export … --format merged` and point vLLM at it")]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    found = _rank_findings(config, max_lora_rank)
    if method == "dora":
        found.append(Finding("DoRA adapters are not supported by vLLM", "export --format merged, or retrain with "
                                                                         "train.method: lora"))
    if config.get("modules_to_save"):
        found.append(Finding(f"modules_to_save {config['modules_to_save']}: vLLM requires none",
                             "retrain without modules_to_save, or export --format merged"))
    if config.get("bias", "none") != "none":
        found.append(Finding(f"bias {config['bias']!r}: vLLM loads bias 'none' only",
                             "retrain with bias none, or export --format merged"))
    found.extend(_module_findings(folder))
    return found


def _rank_findings(config: dict[str, object], max_lora_rank: int) -> list[Finding]:
    patterns = config.get("rank_pattern") or {}
    ranks = [int(str(config.get("r", 0)))] + [int(str(r)) for r in (patterns.values() if isinstance(patterns, dict)
                                                                  else [])]
    rank = max(ranks)
    if rank <= max_lora_rank:
        return []
    fitting = [r for r in VLLM_RANKS if r >= rank]
    if not fitting:
        return [Finding(f"rank {rank} is above the largest --max-lora-rank vLLM accepts ({VLLM_RANKS[-1]})",
                        "retrain with a lower train.lora.r, or export --format merged")]
    return [Finding(f"rank {rank} is above --max-lora-rank {max_lora_rank} (vLLM's default is "
                    f"{VLLM_DEFAULT_MAX_RANK})", f"start vLLM with --max-lora-rank {fitting[0]}", refused=False)]


def _module_findings(folder: Path) -> list[Finding]:
    modules = adapted_modules(folder)
    found = []
    if embeddings := sorted(modules & EMBEDDINGS):
        found.append(Finding(f"LoRA on {', '.join(embeddings)}: recent vLLM versions do not load LoRA on "
                             "embeddings or the output head", "retrain with train.lora.target_modules naming the "
                                                              "attention and MLP projections only, or export --format merged"))
    if unknown := sorted(modules - VLLM_LLAMA_MODULES - EMBEDDINGS):
        found.append(Finding(f"target modules {', '.join(unknown)} are not among those vLLM adapts for llama models "
                             f"({', '.join(sorted(VLLM_LLAMA_MODULES))})",
                             "retrain with those target modules, or export --format merged"))
    return found


def adapted_modules(folder: Path) -> set[str]:
    """The module names (last part, e.g. ``q_proj``) the adapter's weights adapt, read from the
    safetensors header (no weights loaded)."""
    path = folder / "adapter_model.safetensors"
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = set()
    for key in header:
        if key == "__metadata__":
            continue
        parts = key.split(".")
        for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            if marker in parts:
                out.add(parts[parts.index(marker) - 1])
                break
    return out


def render(findings: list[Finding], max_lora_rank: int) -> list[str]:
    """Lines for the console."""
    if not findings:
        return [f"vLLM: loads as is (--enable-lora, --max-lora-rank {max_lora_rank})"]
    return [f"vLLM {'refuses' if f.refused else 'needs'}: {f.what}; {f.fix}" for f in findings]
