"""Crash test: `tuneline run` killed with SIGKILL at seeded random points during training and
continued with `--resume` ends with the adapter of an uninterrupted run, bit for bit; a truncated
newest checkpoint is skipped (with a warning naming it) for the one before it.

The kills land a seeded random time after a seeded random checkpoint appeared: anywhere in a
training step, including inside the next checkpoint's write (one is written every step here).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import tiny_lora_spec

import tuneline
from tuneline.artifacts import ADAPTER_SHA_TAG, tree_sha256

NAME = "crash"
STEP = re.compile(r"step-(\d+)")
# LoRA with dropout (the RNG), accumulation over micro-batches that cross epoch boundaries (the
# seeded batch order), shared-prefix batching on: all of it must continue exactly after a resume
TRAIN = ("{{method: lora, lr: 3.0e-2, max_steps: {steps}, batch_size: 2, grad_accum: 2, seq_len: 96, "
         "precision: fp32, seed: 0, checkpoint_every: 1, lora: {{dropout: 0.1}}}}")


def _spec(folder: Path, model_dir: Path, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = tiny_lora_spec(folder, model_dir, NAME, per_label=5, max_steps=steps, train=TRAIN.format(steps=steps),
                          extra="baseline: {enabled: false}\n")
    spec.write_text(spec.read_text().replace("eval: {", "eval: {compare_base: false, "))
    return spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """The uninterrupted runs, by number of steps (run once each, in this process: the CLI runs the
    same code with the same number of threads)."""
    done: dict[int, tuple[Path, Path]] = {}

    def get(steps: int) -> tuple[Path, Path]:
        if steps not in done:
            folder = tmp_path_factory.mktemp(f"reference-{steps}")
            spec = _spec(folder, tiny_model_dir, steps)
            result = tuneline.run(spec, workspace=folder / "ws", show_progress=False)
            assert result.train.steps == steps and result.train.resumed_from_step is None
            done[steps] = (spec, Path(result.train.adapter_dir))
        return done[steps]

    return get


def _start(spec: Path, ws: Path, log: Path, resume: bool) -> subprocess.Popen:
    import torch

    src = str(Path(tuneline.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "tuneline.cli", "run", str(spec), "-w", str(ws), "--no-progress"]
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=spec.parent, start_new_session=True)


def _newest_step(ckpt_root: Path) -> int:
    try:
        names = os.listdir(ckpt_root)
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) for n in names if (m := STEP.fullmatch(n))), default=0)


def _kill_after(proc: subprocess.Popen, ckpt_root: Path, step: int, delay: float, log: Path) -> int:
    """SIGKILL the run (its whole process group) ``delay`` seconds after checkpoint ``step`` appeared;
    return the newest checkpoint then."""
    deadline = time.monotonic() + 300
    while _newest_step(ckpt_root) < step:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before checkpoint {step}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint {step} after 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    time.sleep(delay)
    assert proc.poll() is None, f"the run finished before it could be killed:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return _newest_step(ckpt_root)


def _truncate_newest(ckpt_root: Path) -> Path:
    newest = ckpt_root / f"step-{_newest_step(ckpt_root):07d}"
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    return newest


def _crash_and_resume(tmp_path: Path, reference: Any, model_dir: Path, steps: int, kills: int, seed: int,
                      truncate_at: int) -> None:
    ref_spec, ref_adapter = reference(steps)
    spec = _spec(tmp_path / "spec", model_dir, steps)
    assert spec.read_text() == ref_spec.read_text()
    ws = tmp_path / "ws"
    ckpt_root = ws / "runs" / NAME / "checkpoints"
    rng = random.Random(seed)
    planned = sorted(rng.sample(range(1, steps), kills))
    killed_at: list[int] = []
    truncated = None
    for i, target in enumerate(planned):
        # past the checkpoints already there, so that every kill lands in training, not at start-up
        target = max(target, _newest_step(ckpt_root) + 1)
        assert target < steps, f"no step left to kill in (killed after checkpoints {killed_at})"
        log = tmp_path / f"run-{i}.log"
        proc = _start(spec, ws, log, resume=i > 0)
        killed_at.append(_kill_after(proc, ckpt_root, target, rng.uniform(0.0, 0.4), log))
        if i == truncate_at:
            truncated = _truncate_newest(ckpt_root)
    log = tmp_path / "final.log"
    proc = _start(spec, ws, log, resume=True)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "registered as crash version 1" in out
    assert truncated is not None and f"checkpoint{truncated}isunusable" in "".join(out.split()), (
        f"no warning naming the truncated {truncated}:\n{out[-3000:]}")
    assert len(killed_at) == kills and max(killed_at) < steps, killed_at

    # the adapter is the uninterrupted run's, bit for bit (weights, config, tokenizer, spec copy)
    adapter = ws / "runs" / NAME / "adapter"
    ref_weights = (ref_adapter / "adapter_model.safetensors").read_bytes()
    assert (adapter / "adapter_model.safetensors").read_bytes() == ref_weights, f"killed after checkpoints {killed_at}"
    assert tree_sha256(adapter) == tree_sha256(ref_adapter)

    # the registered version records that folder's SHA-256, equal to the artifact in the store
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    version = client.get_model_version(NAME, "1")
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    stored = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "download")))
    assert version.tags[ADAPTER_SHA_TAG] == tree_sha256(stored) == tree_sha256(adapter)


def test_killed_runs_resume_to_the_uninterrupted_adapter(tmp_path: Path, reference: Any, tiny_model_dir: Path):
    """Two kills; after the second the newest checkpoint is truncated as well."""
    _crash_and_resume(tmp_path, reference, tiny_model_dir, steps=8, kills=2, seed=16, truncate_at=1)


@pytest.mark.slow
def test_ten_kills_resume_to_the_uninterrupted_adapter(tmp_path: Path, reference: Any, tiny_model_dir: Path):
    _crash_and_resume(tmp_path, reference, tiny_model_dir, steps=24, kills=10, seed=1600, truncate_at=6)
