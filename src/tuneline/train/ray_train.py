"""Training as a Ray Train job (``train.backend: ray``): the same training loop, run by
``train.ray.workers`` Ray workers as the ranks of one data-parallel training
(:mod:`tuneline.train.distributed`: each computes its share of every step, the gradients are
summed across them), on the Ray cluster the spec names.

- **Checkpoints go through Ray's storage** (``train.ray.storage``, by default the workspace's
  ``ray`` folder): the worker of rank 0 reports each checkpoint the loop writes with
  ``ray.train.report``; Ray copies it there.
- **A lost worker** (its process killed, its node gone) stops the worker group; Ray starts a new
  one, up to ``train.ray.max_failures`` times, and every worker resumes from the last checkpoint
  Ray holds. The resumed training is the one an uninterrupted run computes.
- **The result comes back as Ray's last checkpoint**: the adapter (or whole model), the final
  training checkpoint and the training's measures, copied into the run's folder by the driver.
- **Rank 0 logs** the per-step metrics to the run's MLflow tracking (the driver's progress bar
  reads them back), so the tracking URI must be reachable from the workers: a workspace on a
  file system every node sees, or an MLflow server (team mode).

The Ray run is named after the run's folder and its MLflow run id: ``tuneline run --resume``
(same MLflow run) continues the same Ray run, whose storage Ray resumes from; a new run starts a
new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneline.artifacts import atomic_write_text, copy_dir
from tuneline.data.examples import Example
from tuneline.errors import Problem, TrainingError
from tuneline.models import load_model
from tuneline.runtime import Compute
from tuneline.runtime.progress import progress_bar
from tuneline.runtime.raycluster import connect
from tuneline.spec.models import RayTrainSpec
from tuneline.tracking import MetricBatcher
from tuneline.train.checkpoint import checkpoints
from tuneline.train.distributed import adopt_world, leave_world
from tuneline.train.loop import (
    EarlyStoppingCheck,
    TrainOptions,
    TrainResult,
    optimizer_steps,
    train,
)
from tuneline.train.ranks import TrainJob

if TYPE_CHECKING:
    from ray.train import Checkpoint, Result

log = logging.getLogger(__name__)

RESULT = "train_result.json"
# what each reported Ray checkpoint holds: checkpoints/step-N (and best.pt); the last one also
# the saved adapter and the training's measures
CHECKPOINTS, ADAPTER = "checkpoints", "adapter"
PROGRESS_POLL_S = 2.0


@dataclass(frozen=True)
class RayJob:
    """What every Ray worker receives: the training job, and what rank 0 alone needs.

    ``early_stopping(device, precision)`` makes the validation check on the worker (its device,
    which may differ from the driver's); ``tracking`` is (tracking URI, MLflow run id) to log the
    per-step metrics to."""

    job: TrainJob
    eval_examples: list[Example] | None = None
    early_stopping: Callable[[str, str], EarlyStoppingCheck | None] | None = None
    tracking: tuple[str, str] | None = None
    threads: int = 1


def ray_run_name(run_dir: Path, run_id: str) -> str:
    """The Ray run of a tuneline run: the same for a resumed run (same MLflow run), new otherwise."""
    return f"{run_dir.name}-{run_id}"


def train_on_ray(spec: RayTrainSpec, ray_job: RayJob, storage: str, name: str, show_progress: bool) -> TrainResult:
    """Run ``ray_job`` as a Ray Train job on the cluster ``spec`` names; copy the adapter, the last
    checkpoint and the measures into ``ray_job.job.out_dir``; return the measures."""
    connect(spec.address, "train.ray.address")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}
    trainer = TorchTrainer(
        _worker, train_loop_config={"job": ray_job},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    job = ray_job.job
    if not job.resume:  # the run folder gets this training's checkpoint, not next to an older run's
        shutil.rmtree(job.out_dir / CHECKPOINTS, ignore_errors=True)
    log.info("training on Ray: %d workers (%s each), checkpoints in %s/%s", spec.workers, resources, storage, name)
    with _Progress(ray_job, show_progress):
        try:
            result = trainer.fit()
        except Exception as e:  # Ray's TrainingFailedError carries the workers' errors as text
            raise TrainingError(Problem(f"training on Ray failed: {_first_lines(str(e))}",
                                        hint=f"the workers' logs are in Ray's session folder; checkpoints in "
                                             f"{storage}/{name} (tuneline run --resume continues from them)")) from e
    return _collect(result, job.out_dir)


def _first_lines(text: str, n: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[:n])


def _collect(result: Result, out_dir: Path) -> TrainResult:
    """Copy the last Ray checkpoint's adapter and training checkpoint into ``out_dir``."""
    checkpoint = result.checkpoint
    if checkpoint is None or not (result.metrics or {}).get("final"):
        raise TrainingError(f"the Ray training ended without its final checkpoint (metrics: {result.metrics})")
    with checkpoint.as_directory() as got:
        folder = Path(got)
        copy_dir(folder / ADAPTER, out_dir / ADAPTER)
        ckpt_root = out_dir / CHECKPOINTS
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for item in (folder / CHECKPOINTS).iterdir():
            if item.is_dir():
                copy_dir(item, ckpt_root / item.name)
            else:
                shutil.copy2(item, ckpt_root / item.name)
        return TrainResult.from_saved(json.loads((folder / RESULT).read_text()), out_dir / ADAPTER)


class _Progress:
    """The driver's progress bar while Ray trains: the last step rank 0 logged to the tracking."""

    def __init__(self, ray_job: RayJob, enabled: bool) -> None:
        job = ray_job.job
        self.total = optimizer_steps(len(job.examples), job.cfg)
        self.tracking = ray_job.tracking
        self.enabled = enabled and ray_job.tracking is not None
        self.stop = threading.Event()
        self.bar = progress_bar(enabled=self.enabled)
        self.thread = threading.Thread(target=self._poll, name="ray-train-progress", daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.bar.start()
            self.task = self.bar.add_task("train (Ray)", total=self.total)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            if exc[0] is None:
                self.bar.update(self.task, completed=self.total)
            self.bar.stop()

    def _poll(self) -> None:
        from mlflow import MlflowClient

        assert self.tracking is not None
        uri, run_id = self.tracking
        client = MlflowClient(uri)
        while not self.stop.wait(PROGRESS_POLL_S):
            try:
                steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
            except Exception as e:  # the bar is a courtesy: the training goes on without it
                log.debug("progress of the Ray training unavailable: %s", e)
                continue
            if steps:
                self.bar.update(self.task, completed=max(steps))


# ------------------------------------------------------------------ on each Ray worker


def _worker(config: dict[str, Any]) -> None:
    """One rank of the Ray Train job: restore Ray's last checkpoint (after a lost worker, or for a
    resumed run), train alongside the other workers, and (rank 0) report each checkpoint and,
    at the end, the adapter."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    ray_job: RayJob = config["job"]
    job = ray_job.job
    context = ray.train.get_context()
    device = str(get_device())
    torch.set_num_threads(max(1, ray_job.threads))
    world = adopt_world(context.get_local_rank(), device)
    out = Path(tempfile.mkdtemp(prefix="tuneline-ray-train-"))
    try:
        resume = _restore(ray.train.get_checkpoint(), out / CHECKPOINTS, job)
        compute = Compute.resolve(job.cfg.precision, job.cfg.method, device)
        model = load_model(job.source, job.models_dir, device=device, dtype=compute.base_dtype)
        main = world.is_main
        check = ray_job.early_stopping(device, compute.precision) if main and ray_job.early_stopping else None
        with _StepLog(ray_job.tracking if main else None, job.cfg.log_every) as on_step:
            _, result = train(job.cfg, model, job.tokenizer, job.examples, out, TrainOptions(
                resume=resume, eval_examples=ray_job.eval_examples, fingerprint=job.fingerprint, device=device,
                on_step=on_step, show_progress=False, early_stopping=check, world=world,
                on_checkpoint=lambda step, folder: _report(out, step, folder)))
        _report_final(out, result, main)
    finally:
        leave_world(destroy=False)  # Ray Train made the process group, and ends it
        shutil.rmtree(out, ignore_errors=True)


def _restore(checkpoint: Checkpoint | None, ckpt_root: Path, job: TrainJob) -> bool:
    """Put Ray's last checkpoint (or, for a resumed run Ray has none of, the run folder's own
    checkpoints when this node sees them) in ``ckpt_root``; whether there is one to resume from."""
    if checkpoint is not None:
        with checkpoint.as_directory() as got:
            shutil.copytree(Path(got) / CHECKPOINTS, ckpt_root, dirs_exist_ok=True)
        return True
    local = job.out_dir / CHECKPOINTS
    if job.resume and checkpoints(local):
        shutil.copytree(local, ckpt_root, dirs_exist_ok=True)
        return True
    if job.resume:
        log.warning("nothing to resume from: Ray holds no checkpoint of this run and %s is not on this node; "
                    "training starts over", local)
    return False


def _stage(out: Path, step_folder: Path | None) -> Path:
    """A folder to report to Ray: ``checkpoints/step-N`` (and ``best.pt``, the best weights an
    early-stopped run keeps), as hard links where the file system allows (Ray copies them)."""
    stage = out / f".report-{step_folder.name if step_folder else 'final'}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / CHECKPOINTS).mkdir(parents=True)
    if step_folder is not None:
        shutil.copytree(step_folder, stage / CHECKPOINTS / step_folder.name, copy_function=_link)
        best = step_folder.parent / "best.pt"
        if best.is_file():
            _link(best, stage / CHECKPOINTS / best.name)
    return stage


def _link(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _report(out: Path, step: int, folder: Path | None) -> None:
    """Every rank, after each checkpoint: report it (rank 0 has the folder); Ray copies it to its
    storage. Every worker must report the same number of times."""
    import ray.train
    from ray.train import Checkpoint

    if folder is None:
        ray.train.report({"step": step})
        return
    stage = _stage(out, folder)
    try:
        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _report_final(out: Path, result: TrainResult, main: bool) -> None:
    """The last report: on rank 0, the adapter, the final checkpoint and the measures."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {"step": result.steps, "final": True}
    if not main:
        ray.train.report(metrics)
        return
    newest = checkpoints(out / CHECKPOINTS)
    stage = _stage(out, newest[0] if newest else None)
    try:
        shutil.copytree(out / ADAPTER, stage / ADAPTER, copy_function=_link)
        atomic_write_text(stage / RESULT, json.dumps(result.to_dict(), indent=2) + "\n")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class _StepLog:
    """Rank 0's per-step metrics, to the run's tracking (as the driver's own training logs them);
    a tracking the worker cannot reach is warned about once and the training goes on."""

    def __init__(self, tracking: tuple[str, str] | None, every: int) -> None:
        self.batcher = None
        if tracking is not None:
            import mlflow

            mlflow.set_tracking_uri(tracking[0])
            self.batcher = MetricBatcher(tracking[1], every)

    def __enter__(self) -> Callable[[int, dict[str, float]], None] | None:
        return self._log if self.batcher is not None else None

    def __exit__(self, *exc: object) -> None:
        self._safely(lambda b: b.flush())

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self._safely(lambda b: b(step, metrics))

    def _safely(self, call: Callable[[Any], None]) -> None:
        if self.batcher is None:
            return
        try:
            call(self.batcher)
        except Exception as e:
            log.warning("cannot log the training's metrics to the tracking from this Ray worker (%s); "
                        "the run gets the training's final measures when it ends", e)
            self.batcher = None
