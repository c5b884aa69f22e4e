"""The training loop: setup, train, checkpoint, save. Reads top to bottom; no hooks to override."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tuneline.artifacts import atomic_write_bytes, replace_dir
from tuneline.data.examples import Example
from tuneline.data.tokenize import Encoded, encode_example, end_of_turn
from tuneline.errors import DataError, Problem
from tuneline.models.loading import training_attention
from tuneline.runtime import autocast_for, resolve_precision
from tuneline.runtime.progress import QuietWhenPiped, progress_bar
from tuneline.spec.models import TrainSpec
from tuneline.train.batching import (
    StemRows,
    collate,
    collate_packed,
    collate_packed_after_prefix,
    epoch_batches,
    shared_prefix_len,
)
from tuneline.train.checkpoint import Spent, resume_checkpoint, save_checkpoint, trainable_state
from tuneline.train.distributed import (
    World,
    gather_state,
    is_sharded,
    load_state,
    shard,
    unsharded_copy,
)
from tuneline.train.folded_prefix import folds
from tuneline.train.loss import answer_loss_sum
from tuneline.train.peft_builders import count_parameters, is_prompt_learning, wrap_for_training
from tuneline.train.stem import (
    Stem,
    StemMemo,
    StemStore,
    build_stem,
    estimated_bytes,
    memory_budget,
    stem_depth,
)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneline.train.batching import Batch
    from tuneline.train.checkpoint import CheckpointMeta

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class EarlyStoppingCheck:
    """Score the model on validation rows during training, every ``every`` optimizer steps and
    after the last one (the spec's ``train.early_stopping``, and a search trial's scores).

    ``score(model)`` returns the metric (the model is in eval mode, gradients off). With
    ``patience``, training stops after that many checks without an improvement of more than
    ``min_delta``; with ``keep_best`` the run ends with the best weights seen (kept on disk in the
    checkpoint folder, so a resumed run keeps them too). ``report(index, value)`` is called after
    each check (1-based index) and may raise to end the run (a pruned search trial). The values
    are recorded as ``TrainResult.validations`` and logged as the ``validation`` metric.
    """

    every: int
    score: Callable[[torch.nn.Module], float]
    maximize: bool = True
    patience: int | None = None
    min_delta: float = 0.0
    keep_best: bool = False
    report: Callable[[int, float], None] | None = None

    def improved(self, value: float, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return not math.isnan(value)
        return value > best + self.min_delta if self.maximize else value < best - self.min_delta


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train` runs, beyond the spec's ``train`` section.

    ``eval_examples``: rows whose loss is measured once at the end (``eval_loss``); ``resume``:
    continue from the last checkpoint in ``out_dir`` whose ``fingerprint`` matches;
    ``on_step(step, metrics)`` is called after every optimizer step (for tracking);
    ``early_stopping`` scores the model during training (early stopping, search trials);
    ``encoded_train`` is ``encode_all(tokenizer, train_examples, cfg.seq_len)`` when the caller
    already has it (a search encodes once for all trials). ``world``: train data-parallel with the
    other ranks of a distributed run (:mod:`tuneline.train.distributed`); only its rank 0 writes
    checkpoints and the adapter, validates and reports progress. ``on_checkpoint(step, folder)`` is
    called on every rank after each checkpoint during training, with the checkpoint's folder on the
    rank that wrote it and None on the others (Ray Train reports it to its storage). ``stem_memo``:
    frozen-layer states shared with other trainings on the same ``encoded_train`` list and base model
    (a search's trials; :class:`~tuneline.train.stem.StemMemo`); ``stem_store``: where they are kept
    on disk for later runs (:class:`~tuneline.train.stem.StemStore`)."""

    eval_examples: list[Example] | None = None
    resume: bool = False
    fingerprint: str = ""
    device: str = "cpu"
    on_step: StepCallback | None = None
    show_progress: bool = True
    early_stopping: EarlyStoppingCheck | None = None
    encoded_train: tuple[list[Encoded], list[str]] | None = None
    world: World | None = None
    on_checkpoint: Callable[[int, Path | None], None] | None = None
    stem_memo: StemMemo | None = None
    stem_store: StemStore | None = None


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    epochs: float
    train_examples: int
    dropped_too_long: int
    train_tokens: int  # over the whole run: a resumed run adds what its checkpoint had spent
    computed_tokens: int  # train_tokens minus the shared prefixes computed once per batch
    seconds: float  # training time over the whole run (every resumed segment), not the wall time since the resume
    tokens_per_second: float
    final_loss: float
    eval_loss: float | None
    trainable_params: int
    total_params: int
    precision: str
    device: str
    resumed_from_step: int | None
    validations: list[tuple[int, float]] = field(default_factory=list)  # (step, value)
    best_step: int | None = None
    best_value: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], adapter_dir: Path) -> TrainResult:
        """A result read back from its :meth:`to_dict` JSON, its adapter now at ``adapter_dir``."""
        return cls(**{**saved, "adapter_dir": str(adapter_dir),
                      "validations": [tuple(v) for v in saved.get("validations", [])]})


def encode_all(tokenizer: PreTrainedTokenizerBase, examples: list[Example], seq_len: int) -> tuple[list[Encoded], list[str]]:
    """Encode examples; return (kept, where-of-dropped) for those longer than ``seq_len``."""
    eot = end_of_turn(tokenizer)
    kept, dropped = [], []
    for ex in examples:
        enc = encode_example(tokenizer, ex, seq_len, eot)
        if len(enc.input_ids) <= seq_len:
            kept.append(enc)
        else:
            dropped.append(ex.where)
    return kept, dropped


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(total: int, warmup: int, kind: str = "cosine") -> Callable[[int], float]:
    """Linear warm-up, then cosine or linear decay to 0, or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _schedule(n_examples: int, cfg: TrainSpec) -> tuple[int, int]:
    """(micro-batches per epoch, total optimizer steps)."""
    return math.ceil(n_examples / cfg.batch_size), optimizer_steps(n_examples, cfg)


def optimizer_steps(n_examples: int, cfg: TrainSpec) -> int:
    """The optimizer steps a training on ``n_examples`` runs: ``train.max_steps``, or
    ``train.epochs`` passes (at least one step)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum))


def steps_per_epoch(n_examples: int, cfg: TrainSpec) -> float:
    """Optimizer steps in one pass over ``n_examples``."""
    return math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum


def _micro_batches(lengths: list[int], cfg: TrainSpec, per_epoch: int, step: int,
                   grouped: bool = True) -> list[list[int]]:
    """The micro-batches (index lists) of optimizer ``step``, deterministic across resumes;
    ``grouped``: of similar lengths (padded rows), else drawn at random (packed rows pad nothing)."""
    out = []
    for k in range(cfg.grad_accum):
        global_mb = step * cfg.grad_accum + k
        epoch, pos = divmod(global_mb, per_epoch)
        out.append(epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, grouped=grouped)[pos])
    return out


def make_batch(examples: list[Encoded], pad_id: int, device: str, pack_capacity: int | None = None,
               share_prefix: bool = False, stem: StemRows | None = None, fold: bool = False) -> Batch:
    """Tensors for one micro-batch on ``device``: padded (optionally with a shared prefix computed
    once), or packed into rows of ``pack_capacity`` tokens (``fold``: a shared prefix packed into
    them, :mod:`tuneline.train.folded_prefix`); with ``stem``, the examples' cached states at the
    top of the frozen layers, laid out the same way."""
    if pack_capacity is None:
        batch = collate(examples, pad_id, share_prefix=share_prefix, stem=stem)
    elif share_prefix:
        batch = collate_packed_after_prefix(examples, pad_id, pack_capacity, stem, fold)
    else:
        batch = collate_packed(examples, pad_id, pack_capacity, stem)
    return cast("Batch", {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})  # same keys


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[list[Encoded]], pad_id: int, precision: str,  # noqa: PLR0913
                         device: str, pack_capacity: int | None = None, share_prefix: bool = False,
                         n_answer: int | None = None, fold: bool = False) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; return (loss, real tokens).

    With ``pack_capacity`` each micro-batch is packed into rows of that many tokens (no padding
    between examples, no attention across them); the loss is the same as unpacked. ``share_prefix``
    and ``fold``: as for :func:`make_batch`. The loss is normalised by the answer tokens of the whole step, not averaged per micro-batch,
    so batch 16 and batch 4 x accumulation 4 give the same gradients (the accumulation-scaling
    bug, where short micro-batches weigh as much as long ones, cannot happen). ``n_answer`` is that
    count when ``micro_batches`` are one rank's share of the step (default: their own count); an
    empty micro-batch is skipped.
    """
    n_answer = n_answer or sum(e.n_answer_tokens for mb in micro_batches for e in mb)
    step_loss, tokens = 0.0, 0
    for mb in micro_batches:
        if not mb:
            continue
        step_loss += backward(model, make_batch(mb, pad_id, device, pack_capacity, share_prefix, fold=fold),
                              n_answer, precision, device)
        tokens += sum(len(e.input_ids) for e in mb)
    return step_loss, tokens


def backward(model: torch.nn.Module, batch: Batch, n_answer: int, precision: str, device: str) -> float:
    """Backward of one micro-batch's answer loss divided by the step's ``n_answer``; return that share."""
    with autocast_for(precision, device):
        loss_sum, _ = answer_loss_sum(model, batch)
    (loss_sum / n_answer).backward()
    return float(loss_sum.detach()) / n_answer


@dataclass(frozen=True)
class _Stepper:
    """What one optimizer step's forward and backward need, on this rank."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    pad_id: int
    precision: str
    device: str
    pack_capacity: int | None
    share_prefix: bool
    world: World | None
    sharded: bool = False
    stem: Stem | None = None  # the frozen layers' states, cached (single process only)
    fold: bool = False  # packed batches carry their shared prefix in a row (folded_prefix)

    def gradients(self, micro: list[list[Encoded]], indices: list[list[int]]) -> tuple[float, int, int]:
        """Backward over one step's micro-batches (``indices`` are their examples' positions in the
        training set; this rank's share of them, the gradients summed over the ranks); return the
        step's (loss, tokens, computed tokens) over every rank."""
        world = self.world
        n_answer = sum(e.n_answer_tokens for mb in micro for e in mb)
        mine = micro if world is None else [world.share(mb) for mb in micro]
        if self.stem is None:
            loss, tokens = accumulate_gradients(self.model, mine, self.pad_id, self.precision, self.device,
                                                self.pack_capacity, self.share_prefix, n_answer, self.fold)
        else:
            loss, tokens = self._from_stem(self.stem, mine, indices, n_answer)
        computed = tokens - sum((len(mb) - 1) * shared_prefix_len(mb) for mb in mine if mb) * self.share_prefix
        if world is None:
            return loss, tokens, computed
        if self.sharded:  # FSDP summed the gradients in the backward passes; each pass needs every rank
            for mb, share in zip(micro, mine, strict=True):
                if not share:
                    self._idle_pass(mb[:1])
        else:
            world.sync_gradients(self.params)
        total_loss, total_tokens, total_computed = world.sum([loss, tokens, computed])
        return total_loss, int(total_tokens), int(total_computed)

    def _from_stem(self, stem: Stem, micro: list[list[Encoded]], indices: list[list[int]],
                   n_answer: int) -> tuple[float, int]:
        """:func:`accumulate_gradients`, each batch starting from its examples' cached frozen-layer states."""
        loss = sum(backward(self.model, make_batch(mb, self.pad_id, self.device, self.pack_capacity, self.share_prefix,
                                                   StemRows([stem.states(i) for i in where], stem.depth), self.fold),
                            n_answer, self.precision, self.device) for mb, where in zip(micro, indices, strict=True))
        return loss, sum(len(e.input_ids) for mb in micro for e in mb)

    def _idle_pass(self, examples: list[Encoded]) -> None:
        """A forward and backward that adds nothing to the gradients (the loss times zero): what a
        rank with no row in a micro-batch runs, so that the sharded model's gathers and reductions
        happen on every rank."""
        batch = make_batch(examples, self.pad_id, self.device)
        with autocast_for(self.precision, self.device):
            loss_sum, _ = answer_loss_sum(self.model, batch)
        (loss_sum * 0.0).backward()


def evaluate_loss(model: torch.nn.Module, encoded: list[Encoded], batch_size: int, pad_id: int, precision: str, device: str) -> float:
    """Mean answer-token loss over ``encoded`` (teacher forcing)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    with torch.no_grad(), autocast_for(precision, device):
        for b in range(0, len(order), batch_size):
            batch = make_batch([encoded[i] for i in order[b : b + batch_size]], pad_id, device, share_prefix=True)
            s, n = answer_loss_sum(model, batch)
            total += float(s)
            count += n
    return total / max(1, count)


def train(
    cfg: TrainSpec,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: list[Example],
    out_dir: Path,
    options: TrainOptions | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train ``model`` on ``train_examples`` per ``cfg``; save the adapter under ``out_dir/adapter``.

    ``options`` (:class:`TrainOptions`): device, resume, tracking callback, early stopping.
    Returns the trained (PEFT-wrapped) model and a :class:`TrainResult`.
    """
    import torch

    opts = options or TrainOptions()
    device, fingerprint, on_step, show_progress = opts.device, opts.fingerprint, opts.on_step, opts.show_progress
    world = opts.world
    main = world is None or world.is_main
    check = opts.early_stopping if main else None  # rank 0 validates; the others stop when it says so

    # --- setup -------------------------------------------------------------------------------
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    encoded, dropped = opts.encoded_train or encode_all(tokenizer, train_examples, cfg.seq_len)
    if dropped:
        log.warning("dropped %d training examples longer than seq_len=%d (first: %s); raise train.seq_len to keep them",
                    len(dropped), cfg.seq_len, dropped[0])
    if not encoded:
        raise DataError(Problem(f"every training example is longer than train.seq_len={cfg.seq_len}",
                                field="train.seq_len", hint="raise train.seq_len"))
    eval_encoded = encode_all(tokenizer, opts.eval_examples, cfg.seq_len)[0] if opts.eval_examples else []
    lengths = [len(e.input_ids) for e in encoded]
    per_epoch, total_steps = _schedule(len(encoded), cfg)

    # ``model`` is the transformers model load_model returned (callers hold it as an nn.Module);
    # transformers types PreTrainedModel.to through functools.wraps, which loses the binding of self
    base = cast("PreTrainedModel", model)
    trained, sharded = _wrap(base, cfg, device, world)
    trainable, total_params = count_parameters(trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, cfg.lr_scheduler))
    pad_id = tokenizer.pad_token_id
    # caches do not mix with activation checkpointing (transformers turns them off), nor with virtual
    # tokens; nor with a sharded model: the prefix pass calls the inner decoder, past the root's gathers
    share_prefix = (cfg.share_prefix and not cfg.gradient_checkpointing and not is_prompt_learning(trained)
                    and not sharded)

    ckpt_root = out_dir / "checkpoints"
    start = _start(ckpt_root, trained, optimizer, scheduler, opts)
    start_step, resumed_from, loss_value, before, history = start.step, start.resumed_from, start.loss, start.spent, start.history
    stem_start = time.perf_counter()
    stem = _frozen_stem(trained, cfg, encoded, (total_steps - start_step) * cfg.grad_accum / per_epoch, pad_id,
                        precision, device, opts)
    stem_seconds = time.perf_counter() - stem_start  # 0 when a search's memo already held the states
    # the prefix packed into the rows, one forward (eager attention; not traced by torch.compile)
    fold = share_prefix and cfg.packs and not cfg.compile and folds(trained)
    stepper = _Stepper(trained, params, pad_id, precision, device, cfg.seq_len if cfg.packs else None,
                       share_prefix, world, sharded, stem, fold)

    # --- train -------------------------------------------------------------------------------
    log.info("training %s params of %s (%.2f%%), %d examples, %d steps, precision %s on %s%s",
             f"{trainable:,}", f"{total_params:,}", 100 * trainable / total_params, len(encoded),
             total_steps, precision, device, f", {world.size} processes" if world is not None else "")
    trained.train()
    # the one pass computing the frozen layers' states is training time too
    tokens_done, computed, t0 = 0, 0, time.perf_counter() - stem_seconds
    done, stopped_early = start_step, False
    progress = _progress(show_progress)
    with progress:
        task = progress.add_task("train", total=total_steps, completed=start_step, loss=float("nan"), tps=0.0)
        for step in range(start_step, total_steps):
            batches = _micro_batches(lengths, cfg, per_epoch, step, grouped=not cfg.packs)
            micro = [[encoded[i] for i in mb] for mb in batches]
            step_loss, step_tokens, step_computed = stepper.gradients(micro, batches)
            tokens_done += step_tokens
            computed += step_computed
            grad_norm = _whole(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                               if cfg.max_grad_norm else torch.tensor(0.0))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = step_loss
            done = step + 1
            elapsed = time.perf_counter() - t0
            tps = tokens_done / elapsed if elapsed > 0 else 0.0
            progress.update(task, completed=done, loss=loss_value, tps=tps)
            metrics = {"train_loss": loss_value, "lr": float(scheduler.get_last_lr()[0]),
                       "grad_norm": float(grad_norm), "tokens_per_second": tps,
                       "epoch": done * cfg.grad_accum / per_epoch}
            if not progress.live_display and (done % cfg.log_every == 0 or done == total_steps):
                log.info("step %d/%d loss %.4f  %.0f tok/s", done, total_steps, loss_value, tps)
            if check is not None and (done % check.every == 0 or done == total_steps):
                value = _run_check(trained, check, history, done, ckpt_root)
                metrics["validation"] = value
                stopped_early = _plateaued(check, history) and done < total_steps
            stopped_early = world.agree(stopped_early) if world is not None else stopped_early
            if on_step is not None:
                on_step(done, metrics)
            if check is not None and check.report is not None and history and history[-1][0] == done:
                check.report(len(history), history[-1][1])  # may raise: a pruned trial ends here
            if stopped_early:
                log.info("early stopping at step %d: no improvement in the last validations", done)
                break
            if done % cfg.checkpoint_every == 0 and done < total_steps:
                spent = before.plus(time.perf_counter() - t0, tokens_done, computed)
                _checkpoint(ckpt_root, done, trained, optimizer, scheduler, opts,
                            {"total_steps": total_steps, "loss": loss_value, "validations": history, **spent.meta()})
    spent = before.plus(time.perf_counter() - t0, tokens_done, computed)  # the whole run's, over every resume
    best_step, best_value = _best(check, history)
    if check is not None and check.keep_best and best_step is not None and best_step != done:
        _load_trainable(trained, ckpt_root / "best.pt")
        log.info("kept the best weights: step %d (validation %.4f)", best_step, best_value)

    # --- save --------------------------------------------------------------------------------
    trained, gathered = _whole_model(trained, optimizer, world, sharded)
    eval_loss = evaluate_loss(trained, eval_encoded, cfg.batch_size, pad_id, precision, device) if eval_encoded else None
    adapter_dir = out_dir / "adapter"
    if main:  # the other ranks hold the same weights
        save_adapter(trained, tokenizer, adapter_dir)
        save_checkpoint(ckpt_root, done, trained, optimizer, scheduler, fingerprint,
                        {"total_steps": total_steps, "loss": loss_value, "validations": history, **spent.meta()},
                        gathered)
    trained.eval()
    result = TrainResult(
        adapter_dir=str(adapter_dir), steps=done, epochs=done * cfg.grad_accum / per_epoch,
        train_examples=len(encoded), dropped_too_long=len(dropped), train_tokens=spent.tokens,
        computed_tokens=spent.computed, seconds=spent.seconds,
        tokens_per_second=spent.tokens / spent.seconds if spent.seconds > 0 else 0.0,
        final_loss=loss_value, eval_loss=eval_loss, trainable_params=trainable, total_params=total_params,
        precision=precision, device=device, resumed_from_step=resumed_from,
        validations=history, best_step=best_step, best_value=best_value, stopped_early=stopped_early,
    )
    return trained, result


def _frozen_stem(model: torch.nn.Module, cfg: TrainSpec, encoded: list[Encoded], passes: float, pad_id: int,
                 precision: str, device: str, opts: TrainOptions) -> Stem | None:
    """The frozen layers' states of every example, computed once (:mod:`tuneline.train.stem`), when
    ``train.cache_frozen_layers`` is on, the lower layers are frozen, training runs in one process, the
    states fit the memory budget, and they save something: the steps left make more than one
    ``passes`` over the examples, or ``opts.stem_memo`` shares them with other trainings on the same
    ``opts.encoded_train`` (a search's trials)."""
    depth = stem_depth(model) if cfg.cache_frozen_layers and opts.world is None else 0
    memo = opts.stem_memo if opts.encoded_train is not None else None
    if not depth or (passes <= 1 and memo is None):
        return None

    def build() -> Stem | None:
        need, budget = estimated_bytes(model, encoded, precision), memory_budget() - (memo.nbytes if memo else 0)
        if need > budget:
            log.info("not caching the %d frozen decoder layers: their states would take %.1f GB, over the %.1f GB "
                     "left of the budget; they are computed in every step", depth, need / 1e9, budget / 1e9)
            return None
        return build_stem(model, encoded, depth, pad_id, precision, device, opts.show_progress, opts.stem_store)

    return build() if memo is None else memo.get(depth, precision, build)


@dataclass(frozen=True)
class _StartingPoint:
    step: int = 0
    resumed_from: int | None = None
    loss: float = float("nan")
    spent: Spent = field(default_factory=Spent)
    history: list[tuple[int, float]] = field(default_factory=list)


def _start(ckpt_root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
           opts: TrainOptions) -> _StartingPoint:
    """Where training starts: the last checkpoint's state restored (``opts.resume``), or a fresh
    checkpoint folder; in a distributed run every replica then takes rank 0's trainable weights."""
    world = opts.world
    sharded = world is not None and is_sharded(model)
    start = _StartingPoint()
    if opts.resume:
        last, meta = _resume(ckpt_root, model, optimizer, scheduler, opts.fingerprint, world, sharded)
        start = _StartingPoint(int(meta["step"]), int(meta["step"]), float(meta.get("loss", "nan")), Spent.of(meta),
                               [(int(a), float(b)) for a, b in meta.get("validations", [])])
        log.info("resumed from %s (step %d of %d)", last.name, start.step, int(meta.get("total_steps", 0)) or start.step)
    elif world is None or world.is_main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    if world is not None and not sharded:  # sharded: full fine-tuning, every rank loaded the same weights
        world.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    ckpt_root.mkdir(parents=True, exist_ok=True)
    return start


def _wrap(base: PreTrainedModel, cfg: TrainSpec, device: str,
          world: World | None) -> tuple[PeftModel | PreTrainedModel, bool]:
    """The model to train on ``device`` (the PEFT wrapper, or the model itself for full
    fine-tuning), sharded across the ranks when ``train.distributed.strategy`` is fsdp (before the
    optimizer is made: it steps the shards); and whether it is sharded. A model loaded with the eager
    attention switches to SDPA for long rows (:func:`~tuneline.models.loading.training_attention`)."""
    attention = training_attention(device, cfg.seq_len)
    if getattr(base.config, "_attn_implementation", attention) == "eager" and attention != "eager":
        base.set_attn_implementation(attention)
    trained: PeftModel | PreTrainedModel = wrap_for_training(base, cfg).to(device)  # type: ignore[arg-type]
    if world is None or cfg.distributed.strategy != "fsdp":
        return trained, False
    shard(trained)
    return trained, True


def _whole_model(model: PeftModel | PreTrainedModel, optimizer: torch.optim.Optimizer, world: World | None,
                 sharded: bool) -> tuple[PeftModel | PreTrainedModel, tuple[dict, dict] | None]:
    """After sharded training: the state gathered whole (every rank takes part) and, on rank 0, a
    plain copy of the model to save and evaluate in one process. Unsharded: the model as it is."""
    if not sharded:
        return model, None
    gathered = gather_state(model, optimizer)
    if world is not None and world.is_main:
        return cast("PreTrainedModel", unsharded_copy(model, gathered[0])), gathered
    return model, gathered


def _resume(ckpt_root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
            fingerprint: str, world: World | None, sharded: bool) -> tuple[Path, CheckpointMeta]:
    """Restore the newest usable checkpoint; in a distributed run rank 0 first (it removes the
    unusable ones it skips), then the others from the same folder. A sharded model loads the whole
    state on every rank, together (each keeps its shard)."""
    if world is None:
        return resume_checkpoint(ckpt_root, model, optimizer, scheduler, fingerprint)
    if sharded:
        return resume_checkpoint(ckpt_root, model, optimizer, scheduler, fingerprint, load_state)
    if not world.is_main:
        world.barrier()
    found = resume_checkpoint(ckpt_root, model, optimizer, scheduler, fingerprint)
    if world.is_main:
        world.barrier()
    return found


def _checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: LRScheduler, opts: TrainOptions, extra: dict[str, object]) -> None:
    """Rank 0 writes the checkpoint of ``step``; a sharded model's state is first gathered whole
    (every rank takes part), so the checkpoint resumes on any number of processes."""
    world = opts.world
    gathered = gather_state(model, optimizer) if world is not None and is_sharded(model) else None
    folder = None
    if world is None or world.is_main:
        folder = save_checkpoint(ckpt_root, step, model, optimizer, scheduler, opts.fingerprint, extra, gathered)
    if opts.on_checkpoint is not None:
        opts.on_checkpoint(step, folder)


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A sharded model's gradient norm is a distributed tensor: its value, whole."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def save_adapter(model: PeftModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter_dir: Path) -> Path:
    """Save the adapter (or whole model) and tokenizer at ``adapter_dir``, atomically and durably:
    written whole in a temporary folder, then put in place of the previous one (never deleted first)."""
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))  # peft annotates the folder as str
    tokenizer.save_pretrained(tmp)
    _sort_peft_sets(model, tmp)
    replace_dir(tmp, adapter_dir)
    return adapter_dir


def _sort_peft_sets(model: torch.nn.Module, folder: Path) -> None:
    """peft writes a set in its config (``target_modules`` once ``all-linear`` is resolved to module
    names) in the set's iteration order, which depends on the process's string hash seed: the same
    training saved two different ``adapter_config.json`` files. Write them sorted."""
    configs = getattr(model, "peft_config", None)
    path = folder / "adapter_config.json"
    if not isinstance(configs, dict) or len(configs) != 1 or not path.is_file():
        return
    sets = [k for k, v in vars(next(iter(configs.values()))).items() if isinstance(v, set)]
    saved = json.loads(path.read_text())
    for key in sets:
        if isinstance(saved.get(key), list):
            saved[key] = sorted(saved[key])
    path.write_text(json.dumps(saved, indent=2, sort_keys=True))  # peft's own layout


def _run_check(model: torch.nn.Module, check: EarlyStoppingCheck, history: list[tuple[int, float]], step: int,
               ckpt_root: Path) -> float:
    """Score the model now; record it; keep its weights when it is the best so far."""
    import torch

    best = _best(check, history)[1]
    model.eval()
    with torch.no_grad():
        value = float(check.score(model))
    model.train()
    history.append((step, value))
    if check.keep_best and check.improved(value, best):
        buf = io.BytesIO()
        torch.save(trainable_state(model), buf)
        atomic_write_bytes(ckpt_root / "best.pt", buf.getvalue())
    return value


def _best(check: EarlyStoppingCheck | None, history: list[tuple[int, float]]) -> tuple[int | None, float | None]:
    """The first check that no later one improved on (by more than min_delta)."""
    best_step, best = None, None
    for step, value in history:
        if check is not None and check.improved(value, best):
            best_step, best = step, value
    return best_step, best


def _plateaued(check: EarlyStoppingCheck, history: list[tuple[int, float]]) -> bool:
    if not check.patience:
        return False
    best_step = _best(check, history)[0]
    since = sum(1 for step, _ in history if best_step is None or step > best_step)
    return since >= check.patience


def _load_trainable(model: torch.nn.Module, path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _progress(enabled: bool) -> QuietWhenPiped:
    return progress_bar(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), enabled=enabled,
    )
