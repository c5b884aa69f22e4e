"""The per-model serving path: a registered version that the shared base's batched LoRA
(:mod:`tuneline.serve.multilora`) cannot compute exactly gets a model of its own.

Which path a version's folder takes (:func:`served_kind`):

- ``lora``: a LoRA adapter MultiLora computes exactly (plain LoRA, rsLoRA: rsLoRA only changes the
  ``scaling`` MultiLora reads). Loaded into the shared base and batched with every other such adapter.
- ``merged``: DoRA (MultiLora's products leave out its magnitude vector), IA3, and a LoRA adapter
  with parts MultiLora does not compute (``modules_to_save``, biases, non-linear layers): a fresh
  copy of the base with the adapter merged into its weights, so it answers as a plain model.
- ``virtual``: prefix and prompt tuning: a fresh copy of the base inside its peft model, generating
  through :class:`tuneline.eval.generate.VirtualTokens` (placeholder columns for the virtual tokens),
  as evaluation does; never through peft's own ``generate``, which drops the prefix.
- ``full``: a fully fine-tuned model (``config.json`` + weights, no ``adapter_config.json``), loaded
  from its folder.
- ``classifier``: ``task.head: classifier``: a fresh copy of the base as a sequence classifier with
  its LoRA merged and its score head; a request is answered with a label after one forward pass
  (:mod:`tuneline.serve.classifier`), nothing generated.

Every per-model version holds a whole model in memory (``docs/methods-serving.md`` has the
measured cost) and is batched only with requests for the same version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from tuneline.errors import Problem, TunelineError
from tuneline.eval.generate import VirtualTokens
from tuneline.serve.classifier import is_classifier_version
from tuneline.train.classifier import load_classifier

if TYPE_CHECKING:
    import os

    import torch
    from transformers import PreTrainedModel

ServedKind = Literal["lora", "merged", "virtual", "full", "classifier"]
PER_MODEL_KINDS: tuple[ServedKind, ...] = ("merged", "virtual", "full", "classifier")
# peft types whose adapters are virtual tokens before the input (peft's PromptLearningConfig subclasses)
PROMPT_LEARNING_TYPES = frozenset({"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"})


def served_kind(folder: str | os.PathLike[str]) -> ServedKind:
    """How the version saved in ``folder`` is served (see the module's docstring); a
    :class:`TunelineError` naming the folder when it holds neither an adapter nor a model."""
    path = Path(folder)
    if is_classifier_version(path):  # task.head: classifier: answered by one forward pass, no generation
        return "classifier"
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        if (path / "config.json").is_file():
            return "full"
        raise TunelineError(Problem(f"{path} holds neither an adapter (adapter_config.json) nor a model (config.json)",
                                    where=str(path), hint="register the `adapter` folder of a finished run"))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunelineError(Problem(f"cannot read {config_file}: {exc}", where=str(config_file),
                                    hint="the adapter folder is damaged: register the run's adapter again")) from exc
    peft_type = str(config.get("peft_type", ""))
    if peft_type in PROMPT_LEARNING_TYPES:
        return "virtual"
    return "lora" if peft_type == "LORA" and lora_batched_exactly(config) else "merged"


def lora_batched_exactly(config: dict[str, object]) -> bool:
    """Whether a LoRA adapter's ``adapter_config.json`` asks only for what MultiLora computes:
    ``scaling * B A x`` on linear layers (rsLoRA's scaling included), no DoRA magnitude, no bias,
    no fully trained modules, no layer replication. (Non-linear target layers show only once it
    is loaded: :func:`tuneline.serve.multilora.computes_exactly`.)"""
    return (not config.get("use_dora") and config.get("bias", "none") == "none" and not config.get("lora_bias")
            and not config.get("modules_to_save") and not config.get("layer_replication")
            and not config.get("trainable_token_indices"))


@dataclass
class PerModel:
    """One version's own model: ``model`` generates (the merged or fully fine-tuned model, or for
    prefix and prompt tuning the peft model's base, with ``virtual`` supplying the virtual tokens)."""

    kind: ServedKind
    model: PreTrainedModel
    virtual: VirtualTokens | None = None

    def inputs(self, ids: torch.Tensor, mask: torch.Tensor, pad: int,
               beams: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
        """A left-padded batch (``ids``, ``mask``) as this model generates it: for virtual tokens,
        ``count`` placeholder columns (attended) before every row, as in evaluation, and the extra
        ``generate`` arguments that put the virtual tokens there."""
        if self.virtual is None:
            return ids, mask, {}
        import torch

        rows, count = ids.shape[0], self.virtual.count
        ids = torch.cat([torch.full((rows, count), pad, dtype=ids.dtype, device=ids.device), ids], dim=1)
        mask = torch.cat([torch.ones((rows, count), dtype=mask.dtype, device=mask.device), mask], dim=1)
        return ids, mask, self.virtual.inputs(ids, beams)


def load_per_model(kind: ServedKind, folder: str, load_base: Callable[[], PreTrainedModel],
                   like: PreTrainedModel) -> PerModel:
    """The model of the version saved in ``folder`` (``kind`` from :func:`served_kind`, not
    ``lora``): ``load_base`` gives a fresh copy of the base for an adapter; a full fine-tune is
    loaded from its folder with the dtype, device and attention of ``like`` (the served base)."""
    if kind == "classifier":
        return PerModel(kind, cast("PreTrainedModel", load_classifier(load_base(), folder)))  # a fresh copy
    if kind == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=like.dtype,
                                                     attn_implementation=like.config._attn_implementation)
        module: torch.nn.Module = model  # transformers' PreTrainedModel.to hides its binding from mypy
        module.to(like.device)
        return PerModel(kind, model.eval())
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_base(), folder).eval()
    if kind == "virtual":
        virtual = VirtualTokens.of(peft_model)
        if virtual is None:  # served_kind said prompt learning; peft disagrees
            raise TunelineError(Problem(f"the adapter in {folder} has no virtual tokens", where=folder))
        return PerModel(kind, cast("PreTrainedModel", virtual.base), virtual)
    merged = cast("PreTrainedModel", peft_model.merge_and_unload())
    return PerModel(kind, merged.eval())


def reload_base(model: PreTrainedModel) -> Callable[[], PreTrainedModel]:
    """A function that loads a fresh copy of ``model`` from the folder it was loaded from, with its
    dtype, device and attention (the engine's default ``load_base``; the server passes its own)."""
    where = str(getattr(model, "name_or_path", "") or "")

    def load() -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        if not where or not Path(where).is_dir():
            raise TunelineError(Problem(f"cannot load another copy of the base model for a per-model version: it was "
                                        f"not loaded from a folder ({where or 'no path recorded'})",
                                        hint="pass load_base= to the Engine"))
        fresh = AutoModelForCausalLM.from_pretrained(where, dtype=model.dtype,
                                                     attn_implementation=model.config._attn_implementation)
        module: torch.nn.Module = fresh
        module.to(model.device)
        return cast("PreTrainedModel", fresh)

    return load
