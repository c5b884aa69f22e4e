"""Data-parallel training: `tuneline run --nproc 2` (torch.distributed, gloo on this CPU) trains the
adapter one process trains with the same global batch, logs the same loss curve, and a 2-process
run killed mid-training resumes on 1 process to the same adapter.

The two runs compute the same sums in a different order and with different padding (each rank pads
its half of a micro-batch to its own longest row), so they agree to rounding, not bit for bit:
- each step's loss is a sum over the step's answer tokens of per-token cross-entropies; its
  tolerance is :func:`helpers.loss_tolerance` (fp32 over the vocabulary and the tokens);
- the gradient norm and the weights carry the same rounding through a few layers, amplified by
  Adam where a gradient element is near zero, more with every step; they are compared relative to
  what training moved:
  the two adapters must differ by under 1% of the largest change training made to any weight, the
  gradient norms by under 1% for 8 steps and 5% after. How far rounding alone goes: the same run
  in one process, only the rows laid out differently (best-fit rows against the even rows the
  trainer packs now), ends 4.6e-4 apart against 0.127 moved (0.37%), its gradient norms 1.5% apart
  at step 12; the same rows in another order, 2.7e-5 (0.02%); one process against two, 3.9e-4
  (0.3%). A loss normalised per rank, or gradients averaged instead of summed, moves both by tens
  of percent from the first steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import loss_tolerance, tiny_lora_spec

import tuneline
from tuneline.workspace import Workspace

STEPS = 12
# 3 labels x 6 rows = 18 rows; 2 micro-batches of 4 per step: steps cross epoch boundaries, and
# the epoch's last micro-batch (2 rows) leaves a rank with a single row
TRAIN = (f"{{method: lora, lr: 2.0e-2, max_steps: {STEPS}, batch_size: 4, grad_accum: 2, seq_len: 96, "
         "precision: fp32, seed: 0, checkpoint_every: 1, max_grad_norm: 1.0, lora: {dropout: 0.0}}")


def _spec(folder: Path, model_dir: Path, train: str = TRAIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = tiny_lora_spec(folder, model_dir, "ddp", per_label=6, train=train, extra="baseline: {enabled: false}\n")
    spec.write_text(spec.read_text().replace("eval: {", "eval: {compare_base: false, "))
    return spec


def _cli(args: list[str], log: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    src = str(Path(tuneline.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200",
           **(env_extra or {})}
    env.pop("OMP_NUM_THREADS", None)  # the launcher gives each rank its share of the cores
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "tuneline", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _kill_after_checkpoint(proc: subprocess.Popen, ckpts: Path, step: int, log: Path) -> None:
    """Kill the run (launcher and ranks) as soon as checkpoint ``step`` is in place, mid-training."""
    deadline = time.monotonic() + 240
    while not (ckpts / f"step-{step:07d}").is_dir():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint {step} within 240 s"
        time.sleep(0.01)
    _kill_tree(proc)
    newest = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert newest < STEPS, "the run had finished training before the kill"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank, as a machine that loses power would (the launcher
    starts its ranks in sessions of their own: killing its process group would leave them running)."""
    import psutil

    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)


def _history(ws: Path, run_id: str, key: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=Workspace.at(ws).tracking_uri)
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """One process, the whole run: its adapter, its loss and gradient-norm curves."""
    ws = tmp_path_factory.mktemp("one") / "ws"
    spec = _spec(tmp_path_factory.mktemp("one-spec"), tiny_model_dir)
    result = tuneline.run(spec, workspace=ws, show_progress=False)
    assert result.train.steps == STEPS
    return {"adapter": _adapter(Path(result.train.adapter_dir)), "tokens": result.train.train_tokens,
            "loss": _history(ws, result.run_id, "train_loss"), "grad_norm": _history(ws, result.run_id, "grad_norm")}


def _assert_same_adapter(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys(), f"the saved adapter lacks {sorted(ref.keys() - got.keys())[:5]}"
    moved = max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3, "training did not move the adapter: the comparison would say nothing"
    for k, v in got.items():
        assert v.shape == ref[k].shape and v.abs().sum() > 0, f"{k} is empty or misshapen: {tuple(v.shape)}"
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= 1e-2 * moved, f"adapters differ by {worst:.3g}; training moved weights by up to {moved:.3g}"


def _assert_same_curve(got: list[float], ref: list[float], tokens_per_step: int, vocab: int) -> None:
    assert len(got) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(got, ref, strict=True), 1):
        tol = loss_tolerance(b, tokens_per_step, vocab, mean=True, c=8.0)["atol"]
        # the rounding grows through Adam's steps: one process, two row layouts, 3.7e-5 apart
        # (relative) at step 12, 2e-6 at step 8
        assert abs(a - b) <= tol + 1e-5 * step * abs(b), f"step {step}: loss {a} vs one process's {b}"


def test_two_processes_train_the_adapter_one_process_trains(reference, tmp_path: Path, tiny_model_dir: Path,
                                                           tokenizer) -> None:
    ws, spec = tmp_path / "ws", _spec(tmp_path / "spec", tiny_model_dir)
    # a gate no model passes: the command's exit code 3 comes through the launcher (the training is the same)
    spec.write_text(spec.read_text().replace('"accuracy >= 0.0"', '"accuracy > 1.0"'))
    proc = _cli(["run", str(spec), "--nproc", "2", "-w", str(ws), "--no-progress", "--json"], tmp_path / "log")
    assert proc.wait(timeout=300) == 3, (tmp_path / "log").read_text()[-4000:]
    out = (tmp_path / "log").read_text()
    result = json.loads(out[out.index("{\n"):])
    assert result["train"]["steps"] == STEPS and result["train"]["train_tokens"] == reference["tokens"]
    _assert_same_adapter(_adapter(Path(result["train"]["adapter_dir"])), reference["adapter"])
    per_step = reference["tokens"] // STEPS
    _assert_same_curve(_history(ws, result["run_id"], "train_loss"), reference["loss"], per_step, len(tokenizer))
    norms = _history(ws, result["run_id"], "grad_norm")
    for step, (a, b) in enumerate(zip(norms, reference["grad_norm"], strict=True), 1):
        # rounding grows about 3x a step through Adam at this learning rate: one process, two row
        # layouts, 1.8e-6 apart at step 3, 5.7e-4 at step 8, 1.5% at step 12
        assert abs(a - b) <= (0.01 if step <= 8 else 0.05) * b, f"step {step}: gradient norm {a} vs one process's {b}"
    assert "2 processes" in out  # rank 0 said how it trained; the other rank printed nothing of its own


def test_a_two_process_run_killed_mid_training_resumes_on_one_process(reference, tmp_path: Path,
                                                                      tiny_model_dir: Path) -> None:
    ws, spec = tmp_path / "ws", _spec(tmp_path / "spec", tiny_model_dir)
    proc = _cli(["run", str(spec), "--nproc", "2", "-w", str(ws), "--no-progress"], tmp_path / "log")
    _kill_after_checkpoint(proc, ws / "runs" / "ddp" / "checkpoints", 3, tmp_path / "log")

    result = tuneline.run(spec, workspace=ws, resume=True, show_progress=False)
    assert result.train.resumed_from_step is not None and 3 <= result.train.resumed_from_step < STEPS
    assert result.train.steps == STEPS and result.train.train_tokens == reference["tokens"]
    _assert_same_adapter(_adapter(Path(result.train.adapter_dir)), reference["adapter"])


def test_what_trains_in_one_process_is_refused_before_any_work(classification_spec: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneline.errors import SpecError
    from tuneline.pipeline import stages
    from tuneline.train.distributed import World

    monkeypatch.setattr(stages, "current_world", lambda: World(rank=0, size=2, local_rank=0, device="cpu"))
    classification_spec.write_text(classification_spec.read_text().replace(
        "type: classification\n", "type: classification\n  head: classifier\n").replace("method: full", "method: lora"))
    ws = tmp_path / "ws"
    with pytest.raises(SpecError, match=r"task.head: classifier trains in one process; it cannot run on 2 processes"):
        tuneline.run(classification_spec, workspace=ws, show_progress=False)
    classification_spec.write_text(classification_spec.read_text().replace("  head: classifier\n", "").replace(
        "method: lora\n", "method: lora\n  backend: ray\n"))
    with pytest.raises(SpecError, match=r"train.backend: ray starts its own 2 workers on the Ray cluster"):
        tuneline.run(classification_spec, workspace=ws, show_progress=False)
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())  # nothing trained, nothing tracked


def test_each_row_of_a_micro_batch_goes_to_exactly_one_rank() -> None:
    from tuneline.train.distributed import World

    for size in (1, 2, 3, 5):
        for n in (0, 1, 2, 7, 8):
            shares = [World(rank, size, rank, "cpu").share(list(range(n))) for rank in range(size)]
            assert sorted(i for share in shares for i in share) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
