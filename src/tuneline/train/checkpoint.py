"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and position, written atomically."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from tuneline.errors import Problem, TrainingError

KEEP_LAST = 2


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    fingerprint: str, extra: dict[str, Any]) -> Path:
    import torch

    target = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "py_rng": random.getstate(),
        },
        tmp / "state.pt",
    )
    (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, **extra}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(ckpt_root.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = sorted(p for p in ckpt_root.glob("step-*") if (p / "meta.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, fingerprint: str) -> dict[str, Any]:
    """Restore state in place; return the checkpoint's meta (with ``step``)."""
    import torch

    meta = json.loads((path / "meta.json").read_text())
    if meta.get("fingerprint") != fingerprint:
        raise TrainingError(Problem(
            f"checkpoint {path} was made with a different spec, data or model",
            hint="run without --resume to start over, or restore the spec and data it was made with"))
    state = torch.load(path / "state.pt", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["py_rng"])
    return meta
