"""Preference tuning (``train.method: dpo``): TRL's DPO trainer on a dataset version's preference
pairs, continuing the LoRA adapter trained on the rows.

The LoRA adapter the loop trained on ``data.train`` is the policy's starting point and, frozen as TRL's
``ref`` adapter copy, the reference model: DPO moves the answers toward the chosen and away from
the rejected ones relative to what supervised tuning taught. Checkpoints go under
``<run>/dpo/``; a resumed run continues from the last one. The saved adapter is a plain LoRA
adapter (the reference copy is dropped), served and exported like any LoRA adapter.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.curation.preferences import PreferencePair
from tuneline.errors import DataError, Problem
from tuneline.runtime import resolve_precision
from tuneline.spec.models import TrainSpec
from tuneline.train import fast_lora

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DPO_DIR = "dpo"
REFERENCE = "ref"  # TRL's name for the frozen copy of the starting adapter


@dataclass
class DPOResult:
    pairs: int
    steps: int
    seconds: float
    final_loss: float
    reward_margin: float  # mean (chosen - rejected) implicit reward at the last logged step
    reward_accuracy: float  # share of pairs whose chosen answer the policy prefers, last logged step
    resumed_from_step: int | None
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def conversational(pairs: list[PreferencePair]) -> list[dict[str, object]]:
    """The pairs in TRL's conversational preference format (its chat template renders them)."""
    return [{"prompt": [dict(m) for m in p.prompt], "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]


def train_dpo(cfg: TrainSpec, model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair],
              out_dir: Path, *, resume: bool = False, device: str = "cpu", show_progress: bool = True) -> DPOResult:
    """Train ``model``'s adapter on ``pairs`` by DPO (``cfg.dpo``); return what it measured."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise DataError(Problem("train.method dpo needs preference pairs, and curation kept none",
                                field="data.preferences", hint="see the dataset version's preferences counts"))
    dpo = cfg.dpo
    fast_lora.uninstall(model)  # TRL switches between the policy and the reference adapter
    work = out_dir / DPO_DIR
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])) if resume else []
    args = DPOConfig(
        output_dir=str(work), per_device_train_batch_size=dpo.batch_size, num_train_epochs=dpo.epochs,
        max_steps=dpo.max_steps or -1, learning_rate=dpo.lr, beta=dpo.beta, loss_type=[dpo.loss_type],
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm or 0.0,
        max_length=cfg.seq_len, seed=cfg.seed, use_cpu=device == "cpu",
        bf16=resolve_precision(cfg.precision, device) == "bf16", report_to=[], logging_steps=1,
        save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=2, disable_tqdm=not show_progress,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(conversational(pairs)),
                         processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    seconds = time.perf_counter() - t0
    if REFERENCE in model.peft_config:
        model.delete_adapter(REFERENCE)
    model.set_adapter("default")
    steps = [h for h in trainer.state.log_history if "loss" in h]
    last = steps[-1] if steps else {}
    log.info("DPO: %d pairs, %d steps in %.0fs, loss %.4f, reward margin %.3f", len(pairs), trainer.state.global_step,
             seconds, last.get("loss", float("nan")), last.get("rewards/margins", float("nan")))
    return DPOResult(
        pairs=len(pairs), steps=trainer.state.global_step, seconds=seconds,
        final_loss=float(last.get("loss", float("nan"))), reward_margin=float(last.get("rewards/margins", float("nan"))),
        reward_accuracy=float(last.get("rewards/accuracies", float("nan"))),
        resumed_from_step=int(checkpoints[-1].name.rsplit("-", 1)[1]) if checkpoints else None,
        history=[{k: float(v) for k, v in h.items() if k in ("step", "loss", "rewards/margins", "rewards/accuracies")}
                 for h in steps],
    )
