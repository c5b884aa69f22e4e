"""Checkpoints: loaded without running code, written durably, and a corrupt newest one is skipped."""

from __future__ import annotations

import json
import logging
import os
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneline.errors import TrainingError
from tuneline.train.checkpoint import (
    KEEP_LAST,
    checkpoints,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)


def _trainer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _train_and_save(root: Path, steps: list[int]) -> tuple[torch.nn.Module, dict[int, dict[str, torch.Tensor]]]:
    """Train a small model, checkpointing at ``steps``; return it and its weights at each one."""
    model, opt, sched = _trainer()
    weights = {}
    for step in range(1, max(steps) + 1):
        _step(model, opt, sched)
        if step in steps:
            save_checkpoint(root, step, model, opt, sched, "fp", {"loss": 0.5})
            weights[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, weights


def _equal_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, expected[n]) for n, p in model.named_parameters())


def test_resume_restores_weights_optimizer_schedule_and_every_rng_exactly(tmp_path: Path):
    """Resumed training continues bit for bit, including dropout (torch), python and numpy draws."""
    model, opt, sched = _trainer()
    for _ in range(2):
        _step(model, opt, sched)
    random.seed(1)
    np.random.seed(1)
    save_checkpoint(tmp_path, 2, model, opt, sched, "fp", {})
    _step(model, opt, sched)
    after = ({n: p.detach().clone() for n, p in model.named_parameters()}, random.random(), np.random.rand())

    fresh, fopt, fsched = _trainer(seed=123)  # other weights and RNG position
    random.seed(99)
    np.random.seed(99)
    path, meta = resume_checkpoint(tmp_path, fresh, fopt, fsched, "fp")
    assert path.name == "step-0000002" and meta["step"] == 2
    _step(fresh, fopt, fsched)
    assert _equal_weights(fresh, after[0])
    assert fsched.get_last_lr() == sched.get_last_lr()
    assert (random.random(), np.random.rand()) == after[1:]


def test_a_checkpoint_holding_code_is_refused_and_never_run(tmp_path: Path):
    """``state.pt`` is read with the safe (weights only) unpickler: a pickled call is refused, not made."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"): create the file
            return (open, (str(marker), "w"))

    folder = tmp_path / "checkpoints" / "step-0000004"
    folder.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": Payload(), "scheduler": {}, "rng": {}}, folder / "state.pt")
    from tuneline.artifacts import file_sha256

    # a whole, untampered-looking checkpoint: the recorded hash is the payload's own
    (folder / "meta.json").write_text(json.dumps({"step": 4, "fingerprint": "fp",
                                                  "state_sha256": file_sha256(folder / "state.pt")}))
    model, opt, sched = _trainer()
    with pytest.raises(TrainingError, match="cannot be loaded safely"):
        load_checkpoint(folder, model, opt, sched, "fp")
    assert not marker.exists(), "loading the checkpoint ran the code pickled in it"
    with pytest.raises(TrainingError, match="no usable checkpoint") as info:
        resume_checkpoint(tmp_path / "checkpoints", model, opt, sched, "fp")
    assert "step-0000004" in str(info.value) and "without --resume" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing state", "empty meta"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str):
    _, weights = _train_and_save(tmp_path, [2, 4])
    newest = tmp_path / "step-0000004"
    state = newest / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "flipped byte":  # a bit flipped in a tensor: still a loadable file, only the hash tells
        _flip_a_tensor_bit(state)
        torch.load(state, weights_only=True)
    elif damage == "missing state":
        state.unlink()
    else:
        (newest / "meta.json").write_text("")

    model, opt, sched = _trainer(seed=5)
    with caplog.at_level(logging.WARNING, logger="tuneline.train.checkpoint"):
        path, meta = resume_checkpoint(tmp_path, model, opt, sched, "fp")
    assert path.name == "step-0000002" and meta["step"] == 2
    assert _equal_weights(model, weights[2])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(newest) in warned[0]
    assert not newest.exists()  # the resumed run writes step 4 again


def _flip_a_tensor_bit(path: Path) -> None:
    """Flip one bit inside the first tensor's bytes of a ``torch.save`` file (an uncompressed zip)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0x01
    path.write_bytes(bytes(data))


def test_when_no_checkpoint_is_usable_the_error_names_each_and_what_to_do(tmp_path: Path):
    _train_and_save(tmp_path, [2, 4])
    for folder in checkpoints(tmp_path):
        (folder / "state.pt").write_bytes(b"not a checkpoint")
    model, opt, sched = _trainer()
    with pytest.raises(TrainingError) as info:
        resume_checkpoint(tmp_path, model, opt, sched, "fp")
    text = str(info.value)
    assert "step-0000004" in text and "step-0000002" in text and "run without --resume" in text


def test_a_checkpoint_of_another_spec_is_an_error_not_a_fallback(tmp_path: Path):
    _train_and_save(tmp_path, [2, 4])
    model, opt, sched = _trainer()
    with pytest.raises(TrainingError, match="different spec"):
        resume_checkpoint(tmp_path, model, opt, sched, "other")
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000004", "step-0000002"]  # nothing removed


def test_leftovers_of_an_interrupted_save_are_not_taken_for_checkpoints(tmp_path: Path):
    _, weights = _train_and_save(tmp_path, [1, 2, 3])
    assert KEEP_LAST == 2 and [p.name for p in checkpoints(tmp_path)] == ["step-0000003", "step-0000002"]
    # what a crash inside a save or a deletion can leave behind
    (tmp_path / ".tmp-step-0000009-123").mkdir()
    (tmp_path / "step-0000008.old").mkdir()
    (tmp_path / ".trash-step-0000001").mkdir()
    model, opt, sched = _trainer(seed=5)
    path, _ = resume_checkpoint(tmp_path, model, opt, sched, "fp")
    assert path.name == "step-0000003" and _equal_weights(model, weights[3])


def test_checkpoint_files_and_folders_are_fsynced_before_they_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Durable: every file is flushed to disk in the temporary folder, and the checkpoints folder
    after the rename; a power loss cannot leave a named checkpoint with empty files."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    model, opt, sched = _trainer()
    target = save_checkpoint(tmp_path, 1, model, opt, sched, "fp", {})
    assert target.name == "step-0000001"
    where = {Path(p).name: i for i, p in enumerate(synced)}
    folder = next(n for n in where if n.startswith(".tmp-step-0000001"))  # the checkpoint's own folder
    # the files and the folder are on disk before the rename, which is made durable last
    assert max(where["state.pt"], where["meta.json"], where[folder]) < synced.index(str(tmp_path))
