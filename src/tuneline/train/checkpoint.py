"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and position.

A checkpoint is a folder ``step-NNNNNNN`` holding ``state.pt`` and ``meta.json`` (which records
``state.pt``'s SHA-256). It is written in a temporary folder, fsynced and renamed into place, so a
crash never leaves a partial folder under a checkpoint's name. ``state.pt`` holds only tensors and
plain Python values and is read with ``torch.load(weights_only=True)``: a checkpoint cannot run
code when it is loaded. Resuming tries the newest checkpoint first and falls back to an older one
(with a warning naming the bad one) when it is corrupt, truncated or unreadable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from tuneline.artifacts import file_sha256, fsync_dir, replace_dir
from tuneline.errors import Problem, TrainingError

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LRScheduler
    from torch.optim.optimizer import StateDict

log = logging.getLogger(__name__)

KEEP_LAST = 2
STATE, META = "state.pt", "meta.json"
_NAME = re.compile(r"step-(\d+)")


class UnusableCheckpoint(Exception):
    """A checkpoint that cannot be read back (corrupt, truncated, refused by the safe loader)."""


# Every random generator training draws from, as tensors and plain values. "python" is
# [version, internal state, gauss] and "numpy" [kind, keys, pos, has_gauss, cached]: lists of mixed
# values (what ``torch.load(weights_only=True)`` reads back), unpacked by :func:`set_rng_state`.
class RngState(TypedDict):
    torch: torch.Tensor
    cuda: list[torch.Tensor] | None
    python: list[Any]
    numpy: NotRequired[list[Any] | None]


# load(model, optimizer, weights, optimizer_state): put a checkpoint's state in place (a sharded model's way)
LoadState = Callable[["torch.nn.Module", "torch.optim.Optimizer", dict[str, Any], dict[str, Any]], None]


class CheckpointState(TypedDict):
    """``state.pt``: the trainable weights, the optimizer's and scheduler's own state dicts, the RNGs."""

    model: dict[str, torch.Tensor]
    optimizer: StateDict
    scheduler: dict[str, Any]  # torch's LRScheduler.state_dict() type
    rng: RngState


class CheckpointMeta(TypedDict, total=False):
    """``meta.json``: the step, what it was made from, ``state.pt``'s hash, and the loop's extras."""

    step: int
    fingerprint: str
    state_sha256: str
    total_steps: int
    loss: float
    validations: list[list[float]]  # [step, value] pairs
    spent_seconds: float  # training time, tokens and computed tokens up to this step, over every process
    spent_tokens: int
    spent_computed: int


@dataclass(frozen=True)
class Spent:
    """What training cost before this process (read from the checkpoint it resumed from), so a
    resumed run reports the whole run's time and tokens, not only its last segment's. A checkpoint
    written before these were recorded counts as nothing spent."""

    seconds: float = 0.0
    tokens: int = 0
    computed: int = 0

    @classmethod
    def of(cls, meta: CheckpointMeta) -> Spent:
        return cls(float(meta.get("spent_seconds", 0.0)), int(meta.get("spent_tokens", 0)),
                   int(meta.get("spent_computed", 0)))

    def plus(self, seconds: float, tokens: int, computed: int) -> Spent:
        return Spent(self.seconds + seconds, self.tokens + tokens, self.computed + computed)

    def meta(self) -> dict[str, float | int]:
        """The checkpoint extras that carry it."""
        return {"spent_seconds": self.seconds, "spent_tokens": self.tokens, "spent_computed": self.computed}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> RngState:
    """Every random generator training draws from, as tensors and plain values (what
    ``torch.load(weights_only=True)`` reads back)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": [int(version), [int(x) for x in internal], None if gauss is None else float(gauss)],
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }


def set_rng_state(state: RngState) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        kind, keys, pos, has_gauss, cached = numpy_state
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder's name; None for anything else (temporary folders, ``.old``)."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoints(ckpt_root: Path) -> list[Path]:
    """The checkpoint folders under ``ckpt_root``, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0, reverse=True)


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, fingerprint: str, extra: Mapping[str, object],
                    state: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """Write the checkpoint of ``step`` durably, then drop all but the last :data:`KEEP_LAST`.
    ``state``: the (weights, optimizer state) to write instead of the model's and the optimizer's
    own (a sharded model's, gathered whole)."""
    import torch

    target = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    buf = io.BytesIO()
    weights, optim = state if state is not None else (trainable_state(model), optimizer.state_dict())
    torch.save({"model": weights, "optimizer": optim,
                "scheduler": scheduler.state_dict(), "rng": rng_state()}, buf)
    data = buf.getvalue()
    (tmp / STATE).write_bytes(data)
    meta = {"step": step, "fingerprint": fingerprint, "state_sha256": hashlib.sha256(data).hexdigest(), **extra}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, target)  # fsyncs the files and the folders before and after the rename
    for old in checkpoints(ckpt_root)[KEEP_LAST:]:
        _discard(old)
    return target


def _discard(path: Path) -> None:
    """Remove a checkpoint: first renamed out of the checkpoint names, so a crash halfway through
    the deletion never leaves a partial folder that looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint folder with a ``meta.json`` (not yet checked for corruption)."""
    found = [p for p in checkpoints(ckpt_root) if (p / META).is_file()]
    return found[0] if found else None


def read_checkpoint(path: Path, fingerprint: str) -> tuple[CheckpointMeta, CheckpointState]:
    """(meta, state) of a checkpoint; :class:`UnusableCheckpoint` when it cannot be read back whole,
    :class:`TrainingError` when it is whole but belongs to another spec, data or model."""
    import torch

    try:
        meta: CheckpointMeta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnusableCheckpoint(f"{META} unreadable: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UnusableCheckpoint(f"{META} has no step")
    if meta.get("fingerprint") != fingerprint:
        raise TrainingError(Problem(
            f"checkpoint {path} was made with a different spec, data or model",
            hint="run without --resume to start over, or restore the spec and data it was made with"))
    try:
        actual = file_sha256(path / STATE)
    except OSError as exc:
        raise UnusableCheckpoint(f"{STATE} unreadable: {exc}") from exc
    if meta.get("state_sha256") not in (None, actual):  # None: written before hashes were recorded
        raise UnusableCheckpoint(f"{STATE} is corrupt or truncated (its SHA-256 is not the one recorded)")
    try:
        state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file; all mean "unusable"
        raise UnusableCheckpoint(f"{STATE} cannot be loaded safely: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and "rng" not in state and "py_rng" in state:  # the format before the RNG was stored as plain values
        state["rng"] = {"torch": state["torch_rng"], "cuda": state.get("cuda_rng"),
                        "python": [state["py_rng"][0], list(state["py_rng"][1]), state["py_rng"][2]]}
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng"} <= state.keys():
        raise UnusableCheckpoint(f"{STATE} lacks the training state")
    return meta, cast(CheckpointState, state)  # torch.load gives Any: its keys were checked just above


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                    fingerprint: str) -> CheckpointMeta:
    """Restore state in place from the checkpoint at ``path``; return its meta (with ``step``)."""
    try:
        meta, state = read_checkpoint(path, fingerprint)
    except UnusableCheckpoint as exc:
        raise TrainingError(Problem(f"checkpoint {path} is unusable: {exc}",
                                    hint="delete it to resume from an older one")) from exc
    _apply(state, model, optimizer, scheduler)
    return meta


def resume_checkpoint(ckpt_root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: LRScheduler, fingerprint: str, load: LoadState | None = None) -> tuple[Path, CheckpointMeta]:
    """Restore the newest usable checkpoint under ``ckpt_root``; return (its folder, its meta).

    A corrupt, truncated or unreadable checkpoint is skipped with a warning naming it, and removed
    once an older one was restored (the resumed run writes it again). ``load(model, optimizer,
    weights, optimizer_state)`` puts the weights and optimizer state in place instead of copying
    them into the parameters (a sharded model)."""
    found = checkpoints(ckpt_root)
    if not found:
        raise TrainingError(Problem(f"nothing to resume: no checkpoint in {ckpt_root}",
                                    hint="run without --resume to start training"))
    bad: list[tuple[Path, str]] = []
    for path in found:
        try:
            meta, state = read_checkpoint(path, fingerprint)
        except UnusableCheckpoint as exc:
            bad.append((path, str(exc)))
            log.warning("checkpoint %s is unusable (%s); trying the one before it", path, exc)
            continue
        _apply(state, model, optimizer, scheduler, load)
        for skipped, _ in bad:
            _discard(skipped)
        return path, meta
    listed = "; ".join(f"{p.name}: {why}" for p, why in bad)
    raise TrainingError(Problem(
        f"no usable checkpoint in {ckpt_root} ({listed})",
        hint=f"run without --resume to train from the start (this replaces {ckpt_root})"))


def _apply(state: CheckpointState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: LRScheduler, load: LoadState | None = None) -> None:
    import torch

    if load is not None:
        load(model, optimizer, state["model"], state["optimizer"])
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
