"""``task.head: classifier``: the base model with a sequence-classification head, trained with LoRA.

The decoder of the loaded causal LM is reused as the backbone of transformers' sequence-classification
model for the same architecture (``AutoModelForSequenceClassification``, one logit per label, pooled at
the last token that is not padding: ``pad_token_id`` is set in its config); peft's ``SEQ_CLS`` task adds
the LoRA adapter and trains the score head in full (``modules_to_save``). Each row is the rendered chat
prompt the generative model sees (:func:`tuneline.data.tokenize.encode_prompt`), its target the label's
index; the loss is cross-entropy over the labels, averaged over the rows of an optimizer step.

Schedule, batching order, seed, precision and checkpoints are the generative loop's own
(:mod:`tuneline.train.loop`, :mod:`tuneline.train.checkpoint`), so a resumed run equals an
uninterrupted one. The adapter folder holds peft's adapter (LoRA and the score head), the tokenizer and
:data:`CLASSIFIER_FILE` (the labels in index order and the padding id the pooling reads).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from tuneline.artifacts import atomic_write_text
from tuneline.data.examples import Example
from tuneline.data.tokenize import encode_prompt
from tuneline.errors import DataError, Problem, TrainingError
from tuneline.runtime import autocast_for, resolve_precision
from tuneline.spec.methods import LORA_SHAPED
from tuneline.spec.models import TrainSpec
from tuneline.train import fast_lora
from tuneline.train.checkpoint import Spent, resume_checkpoint, save_checkpoint
from tuneline.train.loop import (
    TrainOptions,
    TrainResult,
    _lr_lambda,
    _micro_batches,
    _progress,
    _schedule,
    save_adapter,
    seed_everything,
)
from tuneline.train.peft_builders import count_parameters, lora_placement

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.json"  # {"labels": [...], "pad_token_id": int, "architecture": str}


@dataclass(frozen=True)
class Row:
    """One training or evaluation row: the prompt's token ids and the label's index."""

    input_ids: list[int]
    target: int
    where: str


def classifier_from_causal_lm(model: PreTrainedModel, labels: list[str], pad_token_id: int | None,
                              seed: int = 0) -> PreTrainedModel:
    """transformers' sequence-classification model for ``model``'s architecture, sharing ``model``'s
    decoder (nothing is copied) with a new score head of one output per label (seeded normal init, the
    config's ``initializer_range``). ``id2label``/``label2id`` and ``pad_token_id`` are set in its config."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if pad_token_id is None:
        raise TrainingError(Problem("the tokenizer has no padding token: the classifier pools each row at its last "
                                    "token that is not padding", field="task.head"))
    config = copy.deepcopy(model.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.pad_token_id = pad_token_id
    config.problem_type = "single_label_classification"
    with torch.device("meta"):  # the decoder is taken from `model`: only the head gets real weights below
        classifier: PreTrainedModel = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix
    setattr(classifier, prefix, getattr(model, prefix))
    weight = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    for name, module in classifier.named_children():
        if name == prefix:
            continue
        module.to_empty(device=weight.device)
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                with torch.no_grad():
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * config.initializer_range)
                    if sub.bias is not None:
                        sub.bias.zero_()
        module.to(weight.dtype)
    classifier.eval()
    return classifier


def wrap_classifier(model: PreTrainedModel, cfg: TrainSpec) -> PeftModel:
    """peft's ``SEQ_CLS`` LoRA (DoRA, rsLoRA) on the classifier; the score head is trained in full
    (peft puts it in ``modules_to_save``). Trainable weights are fp32 as in the generative loop."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    if cfg.method not in LORA_SHAPED:
        raise TrainingError(Problem(f"head 'classifier' trains LoRA-shaped adapters, not {cfg.method!r}",
                                    field="train.method", hint=f"use one of {', '.join(LORA_SHAPED)}"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = cfg.lora
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        use_dora=cfg.method == "dora", use_rslora=cfg.method == "rslora",
                        **lora_placement(lora, model))
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.fused_lora:
        fast_lora.install(peft_model, group=not cfg.compile)
    return cast("PeftModel", peft_model)


def encode_rows(tokenizer: PreTrainedTokenizerBase, examples: list[Example], labels: list[str],
                seq_len: int) -> tuple[list[Row], list[str]]:
    """The prompt ids and label index of each example; (kept, where-of-dropped) for prompts over ``seq_len``."""
    index = {label: i for i, label in enumerate(labels)}
    kept, dropped = [], []
    for ex in examples:
        label = ex.label if ex.label is not None else ex.reference
        if label not in index:
            raise DataError(Problem(f"label {label!r} is not one of the classifier's {len(labels)} labels",
                                    where=ex.where, field="task.labels"))
        ids = encode_prompt(tokenizer, ex)
        if len(ids) <= seq_len:
            kept.append(Row(ids, index[label], ex.where))
        else:
            dropped.append(ex.where)
    return kept, dropped


def padded(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), padded on the right: the head pools the last non-padding token."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _loss_sum(model: torch.nn.Module, rows: list[Row], pad_id: int, device: str) -> torch.Tensor:
    import torch

    ids, mask = padded([r.input_ids for r in rows], pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    targets = torch.tensor([r.target for r in rows], dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def evaluate_classifier_loss(model: torch.nn.Module, rows: list[Row], batch_size: int, pad_id: int, precision: str,
                             device: str) -> float:
    """Mean cross-entropy over ``rows``."""
    import torch

    total = 0.0
    model.eval()
    with torch.no_grad(), autocast_for(precision, device):
        for b in range(0, len(rows), batch_size):
            total += float(_loss_sum(model, rows[b : b + batch_size], pad_id, device))
    return total / max(1, len(rows))


def train_classifier(
    cfg: TrainSpec,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: list[Example],
    out_dir: Path,
    options: TrainOptions | None = None,
    *,
    labels: list[str],
) -> tuple[torch.nn.Module, TrainResult]:
    """Train a classifier head with LoRA on ``model`` (the causal LM :func:`load_model` returned) and
    save it under ``out_dir/adapter``; the counterpart of :func:`tuneline.train.loop.train` (same
    options but ``early_stopping``, same result). ``labels``: the label set, in the head's index order."""
    import torch

    opts = options or TrainOptions()
    device = opts.device
    if opts.early_stopping is not None:
        raise TrainingError(Problem("early stopping is not available with head 'classifier'",
                                    field="train.early_stopping", hint="remove it"))
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    rows, dropped = encode_rows(tokenizer, train_examples, labels, cfg.seq_len)
    if dropped:
        log.warning("dropped %d training prompts longer than seq_len=%d (first: %s); raise train.seq_len to keep them",
                    len(dropped), cfg.seq_len, dropped[0])
    if not rows:
        raise DataError(Problem(f"every training prompt is longer than train.seq_len={cfg.seq_len}",
                                field="train.seq_len", hint="raise train.seq_len"))
    eval_rows = encode_rows(tokenizer, opts.eval_examples, labels, cfg.seq_len)[0] if opts.eval_examples else []
    lengths = [len(r.input_ids) for r in rows]
    per_epoch, total_steps = _schedule(len(rows), cfg)
    pad_id = cast(int, tokenizer.pad_token_id)

    base = classifier_from_causal_lm(cast("PreTrainedModel", model), labels, pad_id, cfg.seed)
    trained = wrap_classifier(base, cfg)
    trained.to(device)
    trainable, total_params = count_parameters(trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps), cfg.lr_scheduler))

    ckpt_root = out_dir / "checkpoints"
    start_step, resumed_from, loss_value, before = 0, None, float("nan"), Spent()
    if opts.resume:
        last, meta = resume_checkpoint(ckpt_root, trained, optimizer, scheduler, opts.fingerprint)
        start_step = resumed_from = int(meta["step"])
        before = Spent.of(meta)
        loss_value = float(meta.get("loss", "nan"))
        log.info("resumed from %s (step %d of %d)", last.name, start_step, total_steps)
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    ckpt_root.mkdir(parents=True, exist_ok=True)

    log.info("training a %d-label classifier head with %s: %s params of %s (%.2f%%), %d rows, %d steps, "
             "precision %s on %s", len(labels), cfg.method, f"{trainable:,}", f"{total_params:,}",
             100 * trainable / total_params, len(rows), total_steps, precision, device)
    trained.train()
    tokens_done, t0, done = 0, time.perf_counter(), start_step
    with _progress(opts.show_progress) as progress:
        task = progress.add_task("train classifier", total=total_steps, completed=start_step, loss=float("nan"),
                                 tps=0.0)
        for step in range(start_step, total_steps):
            micro = [[rows[i] for i in mb] for mb in _micro_batches(lengths, cfg, per_epoch, step)]
            n_rows = sum(len(mb) for mb in micro)
            step_loss = 0.0
            for mb in micro:
                with autocast_for(precision, device):
                    loss_sum = _loss_sum(trained, mb, pad_id, device)
                (loss_sum / n_rows).backward()
                step_loss += float(loss_sum.detach()) / n_rows
                tokens_done += sum(len(r.input_ids) for r in mb)
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                         if cfg.max_grad_norm else torch.tensor(0.0))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value, done = step_loss, step + 1
            elapsed = time.perf_counter() - t0
            tps = tokens_done / elapsed if elapsed > 0 else 0.0
            progress.update(task, completed=done, loss=loss_value, tps=tps)
            if not progress.live_display and (done % cfg.log_every == 0 or done == total_steps):
                log.info("step %d/%d loss %.4f  %.0f tok/s", done, total_steps, loss_value, tps)
            if opts.on_step is not None:
                opts.on_step(done, {"train_loss": loss_value, "lr": float(scheduler.get_last_lr()[0]),
                                    "grad_norm": float(grad_norm), "tokens_per_second": tps,
                                    "epoch": done * cfg.grad_accum / per_epoch})
            if done % cfg.checkpoint_every == 0 and done < total_steps:
                spent = before.plus(time.perf_counter() - t0, tokens_done, tokens_done)
                save_checkpoint(ckpt_root, done, trained, optimizer, scheduler, opts.fingerprint,
                                {"total_steps": total_steps, "loss": loss_value, **spent.meta()})
    spent = before.plus(time.perf_counter() - t0, tokens_done, tokens_done)  # the whole run's, over every resume

    eval_loss = (evaluate_classifier_loss(trained, eval_rows, cfg.batch_size, pad_id, precision, device)
                 if eval_rows else None)
    adapter_dir = save_classifier(trained, tokenizer, labels, out_dir / "adapter")
    save_checkpoint(ckpt_root, done, trained, optimizer, scheduler, opts.fingerprint,
                    {"total_steps": total_steps, "loss": loss_value, **spent.meta()})
    trained.eval()
    return trained, TrainResult(
        adapter_dir=str(adapter_dir), steps=done, epochs=done * cfg.grad_accum / per_epoch,
        train_examples=len(rows), dropped_too_long=len(dropped), train_tokens=spent.tokens,
        computed_tokens=spent.computed, seconds=spent.seconds,
        tokens_per_second=spent.tokens / spent.seconds if spent.seconds > 0 else 0.0, final_loss=loss_value,
        eval_loss=eval_loss, trainable_params=trainable, total_params=total_params, precision=precision,
        device=device, resumed_from_step=resumed_from)


def save_classifier(model: PeftModel, tokenizer: PreTrainedTokenizerBase, labels: list[str], folder: Path) -> Path:
    """peft's ``save_pretrained`` (LoRA and the score head), the tokenizer, and :data:`CLASSIFIER_FILE`."""
    save_adapter(model, tokenizer, folder)
    base = cast("PreTrainedModel", model.get_base_model())
    info = {"labels": list(labels), "pad_token_id": base.config.pad_token_id,
            "architecture": type(base).__name__}
    atomic_write_text(folder / CLASSIFIER_FILE, json.dumps(info, indent=2) + "\n")
    return folder


def is_classifier_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a classifier-head adapter (peft task ``SEQ_CLS``)."""
    config = Path(folder) / "adapter_config.json"
    if (Path(folder) / CLASSIFIER_FILE).is_file():
        return True
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("task_type") == "SEQ_CLS")
    except ValueError:
        return False


def classifier_labels(folder: str | Path) -> tuple[list[str], int]:
    """(labels in head order, padding id) recorded in a classifier adapter folder."""
    path = Path(folder) / CLASSIFIER_FILE
    try:
        info = json.loads(path.read_text())
        return [str(x) for x in info["labels"]], int(info["pad_token_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(Problem(f"{path} is missing or unreadable ({exc}): the classifier's labels are unknown",
                                    hint="train the classifier again: its adapter folder is incomplete")) from exc


def load_classifier(model: PreTrainedModel, folder: str | Path, merge: bool = True) -> PreTrainedModel | PeftModel:
    """The classifier saved in ``folder`` on ``model`` (the causal LM it was trained on, loaded as
    :func:`load_model` loads it; its decoder becomes the classifier's, so do not use ``model`` after):
    LoRA merged into the weights and the trained score head in place (``merge``), else the peft model."""
    from peft import PeftModel

    labels, pad_id = classifier_labels(folder)
    base = classifier_from_causal_lm(model, labels, pad_id)
    loaded = PeftModel.from_pretrained(base, str(folder))
    if not merge:
        return loaded
    merged = cast("PreTrainedModel", loaded.merge_and_unload())
    dtype = getattr(merged, merged.base_model_prefix).dtype
    merged.to(dtype)  # the trained head was kept fp32 for the optimizer: it computes in the decoder's dtype
    merged.eval()
    return merged

