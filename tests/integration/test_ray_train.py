"""`train.backend: ray`: the training runs as a Ray Train job of 2 workers on an existing Ray cluster
(`train.ray.address`): a one-node cluster this test starts with `ray start --head` (the CPU build of
Ray from the `[ray]` extra; gloo between the workers). Ray resolves a loopback address to the
machine's own, so the cluster listens there, guarded by Ray's token authentication (on by default
in Ray 2.60). The run ends with the adapter one process trains (within the tolerance
test_distributed.py states: 0.1% of the largest change training made). In the slow set, one worker
process is SIGKILLed mid-training: Ray starts a new worker group, which resumes from the last
checkpoint Ray holds, and the run ends with that same adapter."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_servers import RayCluster, ray_cluster, train_workers
from test_distributed import STEPS, TRAIN, _adapter, _assert_same_adapter, _cli, _spec, reference  # noqa: F401

pytest.importorskip("ray.train")

# 2 workers of 1 CPU each, a checkpoint every 3 of the 12 steps; a lost worker group is restarted up to twice
RAY = TRAIN.replace("checkpoint_every: 1,", "checkpoint_every: 3, backend: ray, "
                    "ray: {address: 'ADDRESS', workers: 2, cpus_per_worker: 1, max_failures: 2},")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(num_cpus=2) as c:
        yield c


def _kill_a_worker_after_a_checkpoint(proc, cluster: RayCluster, storage: Path, log: Path) -> int:
    """Once Ray holds a checkpoint of the training (its controller registered one: it writes its
    checkpoint list in the storage), SIGKILL one of the 2 worker processes; its pid."""
    deadline = time.monotonic() + 300
    while not list(storage.glob("*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "Ray held no checkpoint within 300 s"
        time.sleep(0.05)
    workers = train_workers(cluster)
    assert len(workers) == 2, f"expected 2 Ray Train workers, found {[w.pid for w in workers]}"
    victim = max(workers, key=lambda w: w.pid)
    victim.kill()
    return victim.pid


def _finished(proc, log: Path, ws: Path) -> dict:
    """The run's training result, once the command has exited 0; its run folder holds what a local
    training leaves there: the adapter and the last checkpoint."""
    try:
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    result = json.loads(out[out.index("{\n"):])["train"]
    adapter = Path(result["adapter_dir"])
    assert adapter.parent == ws / "runs" / "ddp" and (adapter.parent / "checkpoints" / f"step-{STEPS:07d}").is_dir()
    return result


def test_training_on_ray_trains_the_adapter_one_process_trains(reference, cluster: RayCluster, tmp_path: Path,  # noqa: F811
                                                               tiny_model_dir: Path) -> None:
    ws, log = tmp_path / "ws", tmp_path / "log"
    spec = _spec(tmp_path / "spec", tiny_model_dir, RAY.replace("ADDRESS", cluster.address))
    result = _finished(_cli(["run", str(spec), "-w", str(ws), "--no-progress", "--json"], log, cluster.env), log, ws)
    assert result["resumed_from_step"] is None
    assert result["steps"] == STEPS and result["train_tokens"] == reference["tokens"]
    _assert_same_adapter(_adapter(Path(result["adapter_dir"])), reference["adapter"])


@pytest.mark.slow  # a second worker group started after the kill (~25 s more here); the run above stays in the default run
def test_training_on_ray_finishes_after_a_worker_is_killed(reference, cluster: RayCluster, tmp_path: Path,  # noqa: F811
                                                           tiny_model_dir: Path) -> None:
    ws, log = tmp_path / "ws", tmp_path / "log"
    spec = _spec(tmp_path / "spec", tiny_model_dir, RAY.replace("ADDRESS", cluster.address))
    proc = _cli(["run", str(spec), "-w", str(ws), "--no-progress", "--json"], log, cluster.env)
    try:
        killed = _kill_a_worker_after_a_checkpoint(proc, cluster, ws / "ray", log)
    except BaseException:
        proc.kill()
        raise
    result = _finished(proc, log, ws)
    assert result["resumed_from_step"] is not None and 1 <= result["resumed_from_step"] < STEPS, (
        f"worker {killed} was killed, yet the training did not resume from a checkpoint")
    assert result["steps"] == STEPS and result["train_tokens"] == reference["tokens"]
    _assert_same_adapter(_adapter(Path(result["adapter_dir"])), reference["adapter"])
