"""Sharded full fine-tuning (FSDP2) over `tuneline run --nproc 2` (gloo on this CPU): the model saved
at the end is whole and equals what one process trains; in the slow set, so does a run killed after
a checkpoint and resumed on 2 processes. A sharded run's checkpoint has the layout of a one-process
checkpoint and loads back into a sharded model. Beside test_distributed.py (a file of its own, so
pytest-xdist runs the two on different workers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_distributed import STEPS, _cli, _kill_after_checkpoint, _spec

import tuneline

# full fine-tuning sharded with FSDP2 over 2 processes: every weight is trained, and each rank
# holds half of each one; the model saved at the end must be the whole model
FULL = (f"{{method: full, lr: 1.0e-3, max_steps: {STEPS}, batch_size: 4, grad_accum: 2, seq_len: 96, "
        "precision: fp32, seed: 0, checkpoint_every: 3, max_grad_norm: 1.0, distributed: {strategy: fsdp}}")


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """The full fine-tuning on one process: its saved model, the initial one, its trainable count."""
    root = tmp_path_factory.mktemp("one")
    one = tuneline.run(_spec(root / "spec", tiny_model_dir, FULL), workspace=root / "ws", show_progress=False)
    return {"model": _weights(Path(one.train.adapter_dir)), "initial": _weights(tiny_model_dir),
            "trainable": one.train.trainable_params}


def _assert_whole_and_equal(result: dict, one: dict) -> None:
    """The model a sharded run saved is whole (every weight at its full shape) and equals the one-process model."""
    assert result["train"]["steps"] == STEPS
    assert result["train"]["trainable_params"] == one["trainable"]  # counted whole, not one shard
    ref, initial = one["model"], one["initial"]
    got = _weights(Path(result["train"]["adapter_dir"]))
    assert got.keys() == ref.keys(), f"the saved model lacks {sorted(ref.keys() - got.keys())[:5]}"
    for k, v in got.items():
        assert v.shape == ref[k].shape, f"{k}: saved {tuple(v.shape)}, the model's is {tuple(ref[k].shape)} (a shard?)"
    moved = max(float((ref[k] - initial[k]).abs().max()) for k in ref if k in initial)
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert moved > 1e-4, "training did not move the weights: the comparison would say nothing"
    # measured: 4.0e-7 apart where training moved weights by up to 6.6e-3 (0.006%)
    assert worst <= 1e-3 * moved, f"the models differ by {worst:.3g}; training moved weights by up to {moved:.3g}"


def _result(log: Path) -> dict:
    out = log.read_text()
    return json.loads(out[out.index("{\n"):])


def test_sharded_full_fine_tuning_saves_the_whole_model(one_process: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    ws, spec, log = tmp_path / "ws", _spec(tmp_path / "spec", tiny_model_dir, FULL), tmp_path / "log"
    proc = _cli(["run", str(spec), "--nproc", "2", "-w", str(ws), "--no-progress", "--json"], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    _assert_whole_and_equal(_result(log), one_process)


@pytest.mark.slow  # two more 2-process runs (~50 s here); the one above and the DDP kill test stay in the default run
def test_sharded_full_fine_tuning_killed_and_resumed_saves_the_whole_model(one_process: dict, tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    ws, spec, log = tmp_path / "ws", _spec(tmp_path / "spec", tiny_model_dir, FULL), tmp_path / "log"
    proc = _cli(["run", str(spec), "--nproc", "2", "-w", str(ws), "--no-progress"], log)
    _kill_after_checkpoint(proc, ws / "runs" / "ddp" / "checkpoints", 3, log)
    proc = _cli(["run", str(spec), "--nproc", "2", "-w", str(ws), "--no-progress", "--resume", "--json"], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    result = _result(log)
    assert 3 <= result["train"]["resumed_from_step"] < STEPS
    _assert_whole_and_equal(result, one_process)


def test_a_sharded_checkpoint_has_the_one_process_layout(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What a sharded run gathers for its checkpoint is what a one-process run writes (weights by
    name, optimizer state by parameter index), and loads back into a sharded model: a world of one
    process, where FSDP2 keeps every parameter whole and computes what the plain model computes."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tuneline.train.checkpoint import trainable_state
    from tuneline.train.distributed import gather_state, load_state, shard

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        ids = torch.arange(2, 34).reshape(2, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        sharded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        shard(sharded)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, sharded)]
        step(plain, opts[0])
        step(sharded, opts[1])
        weights, optim = gather_state(sharded, opts[1])
        expected_weights, expected_optim = trainable_state(plain), opts[0].state_dict()
        assert weights.keys() == expected_weights.keys()
        for name, value in expected_weights.items():
            torch.testing.assert_close(weights[name], value)
        assert optim["state"].keys() == expected_optim["state"].keys()
        assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in expected_optim["param_groups"]]
        for i, state in expected_optim["state"].items():
            torch.testing.assert_close(optim["state"][i]["exp_avg_sq"], state["exp_avg_sq"])

        # the plain layout loads into a fresh sharded model, and the next step matches the plain model's
        again = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        shard(again)
        opt = torch.optim.AdamW(again.parameters(), lr=1e-3)
        # copies, as a checkpoint read from disk is: the live optimizer's step counters are tensors
        # that its next step increments in place
        load_state(again, opt, copy.deepcopy(expected_weights), copy.deepcopy(expected_optim))
        step(plain, opts[0])
        step(again, opt)
        after, _ = gather_state(again, opt)
        for name, value in trainable_state(plain).items():
            torch.testing.assert_close(after[name], value)
    finally:
        dist.destroy_process_group()
