"""Crash test: `tuneline run` killed with SIGKILL at seeded random points during training and
continued with `--resume` ends with the adapter of an uninterrupted run, bit for bit; a truncated
newest checkpoint is skipped (with a warning naming it) for the one before it.

The kills land a seeded random time (up to 0.2 s) after a seeded random checkpoint appeared: anywhere
in a training step, including inside the next checkpoint's write (one is written every step here).
"""

from __future__ import annotations

import logging
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
from tuneline.artifacts import ADAPTER_SHA_TAG, CARD_FILE, tree_sha256

STEP = re.compile(r"step-(\d+)")
# LoRA with dropout (the RNG), accumulation over micro-batches that cross epoch boundaries (the
# seeded batch order), shared-prefix batching on: all of it must continue exactly after a resume
TRAIN = ("{{method: lora, lr: 3.0e-2, max_steps: {steps}, batch_size: 2, grad_accum: 2, seq_len: 96, "
         "precision: fp32, seed: 0, checkpoint_every: 1, lora: {{dropout: 0.1}}}}")


def _spec(folder: Path, model_dir: Path, name: str, steps: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = tiny_lora_spec(folder, model_dir, name, per_label=5, max_steps=steps, train=TRAIN.format(steps=steps),
                          extra="baseline: {enabled: false}\n")
    spec.write_text(spec.read_text().replace("eval: {", "eval: {compare_base: false, "))
    return spec


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace (tracking store, dataset versions) for the reference and the crashed runs."""
    return tmp_path_factory.mktemp("crash") / "ws"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, workspace: Path) -> Any:
    """The uninterrupted run's adapter, by number of steps (run once each, in this process: the
    CLI runs the same code with the same number of threads). Its spec differs from the crashed
    run's in the name only."""
    done: dict[int, Path] = {}

    def get(steps: int) -> Path:
        if steps not in done:
            spec = _spec(tmp_path_factory.mktemp("reference"), tiny_model_dir, f"reference-{steps}", steps)
            result = tuneline.run(spec, workspace=workspace, show_progress=False)
            assert result.train.steps == steps and result.train.resumed_from_step is None
            done[steps] = Path(result.train.adapter_dir)
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


def _crash_and_resume(tmp_path: Path, workspace: Path, ref_adapter: Path, model_dir: Path, steps: int, kills: int,
                      seed: int, truncate_at: int, caplog: pytest.LogCaptureFixture, final_in_process: bool) -> None:
    name = f"crash-{steps}"
    spec = _spec(tmp_path / "spec", model_dir, name, steps)
    ckpt_root = workspace / "runs" / name / "checkpoints"
    rng = random.Random(seed)
    killed_at: list[int] = []
    truncated = None
    for i in range(kills):
        # a checkpoint past those already there (so every kill lands in training, not at start-up),
        # leaving room for the kills still to come; the last step is never a target
        newest = _newest_step(ckpt_root)
        room = steps - 2 - newest
        assert room >= kills - i, f"no room left for {kills - i} kills (killed after checkpoints {killed_at})"
        target = newest + rng.randint(1, room // (kills - i))
        log = tmp_path / f"run-{i}.log"
        proc = _start(spec, workspace, log, resume=i > 0)
        killed_at.append(_kill_after(proc, ckpt_root, target, rng.uniform(0.0, 0.2), log))
        if i == truncate_at:
            truncated = _truncate_newest(ckpt_root)
    assert len(killed_at) == kills and max(killed_at) < steps, killed_at
    if final_in_process:  # the same `tuneline run --resume`, without starting python once more
        with caplog.at_level(logging.INFO):
            result = tuneline.run(spec, workspace=workspace, resume=True, show_progress=False)
        assert result.model_version == 1
        out = "\n".join(r.getMessage() for r in caplog.records)
    else:
        log = tmp_path / "final.log"
        proc = _start(spec, workspace, log, resume=True)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        out = log.read_text()
        assert f"registered as {name} version 1" in out
    # the run after the truncation warned, naming the checkpoint it skipped
    after = out if truncate_at == kills - 1 else (tmp_path / f"run-{truncate_at + 1}.log").read_text()
    assert truncated is not None and f"checkpoint{truncated}isunusable" in "".join(after.split()), (
        f"no warning naming the truncated {truncated}:\n{after[-3000:]}")
    resumed = [int(m.group(1)) for m in re.finditer(r"resumed from step-(\d+)", after)]
    assert resumed and resumed[0] < int(truncated.name.split("-")[1])  # from the one before it

    # the adapter is the uninterrupted run's, bit for bit (weights, config, tokenizer; the spec copy
    # differs in the name only, the model card in the run it describes)
    adapter = workspace / "runs" / name / "adapter"
    ref_weights = (ref_adapter / "adapter_model.safetensors").read_bytes()
    assert (adapter / "adapter_model.safetensors").read_bytes() == ref_weights, f"killed after checkpoints {killed_at}"
    files = sorted(p.name for p in ref_adapter.iterdir())
    assert sorted(p.name for p in adapter.iterdir()) == files
    for f in files:
        if f not in ("tuneline.yaml", CARD_FILE):
            assert (adapter / f).read_bytes() == (ref_adapter / f).read_bytes(), f
    assert (adapter / "tuneline.yaml").read_text() == spec.read_text()

    # the registered version records that folder's SHA-256, equal to the artifact in the store
    import mlflow

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    version = mlflow.MlflowClient(uri).get_model_version(name, "1")
    mlflow.set_tracking_uri(uri)
    stored = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "download")))
    assert version.tags[ADAPTER_SHA_TAG] == tree_sha256(stored) == tree_sha256(adapter)


def test_killed_runs_resume_to_the_uninterrupted_adapter(tmp_path: Path, reference: Any, workspace: Path,
                                                        tiny_model_dir: Path, caplog: pytest.LogCaptureFixture):
    """Two kills; after the second the newest checkpoint is truncated as well."""
    _crash_and_resume(tmp_path, workspace, reference(8), tiny_model_dir, steps=8, kills=2, seed=16, truncate_at=1,
                      caplog=caplog, final_in_process=True)


@pytest.mark.slow
def test_ten_kills_resume_to_the_uninterrupted_adapter(tmp_path: Path, reference: Any, workspace: Path,
                                                      tiny_model_dir: Path, caplog: pytest.LogCaptureFixture):
    """Ten kills, every run (the last included) through the command line."""
    _crash_and_resume(tmp_path, workspace, reference(32), tiny_model_dir, steps=32, kills=10, seed=1600,
                      truncate_at=6, caplog=caplog, final_in_process=False)
