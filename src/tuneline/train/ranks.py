"""The ranks of a distributed run other than 0: they wait for a training job from rank 0, load the
same base model, train their share of every step alongside it, and wait for the next job (or the
end of the run). Rank 0 runs everything else (see :mod:`tuneline.train.distributed`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline.data.examples import Example
from tuneline.errors import TrainingError
from tuneline.models import ModelSource, load_model
from tuneline.spec.models import TrainSpec
from tuneline.train.distributed import World
from tuneline.train.loop import TrainOptions, train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs to train alongside rank 0 (sent pickled)."""

    cfg: TrainSpec
    source: ModelSource
    models_dir: Path
    base_dtype: str
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    out_dir: Path
    resume: bool
    fingerprint: str


def send_job(world: World, job: TrainJob) -> None:
    """Rank 0: start ``job`` on every other rank (then train it itself with ``TrainOptions(world=...)``)."""
    world.send(job)


def release(world: World) -> None:
    """Rank 0: the run is over; the other ranks stop waiting for jobs."""
    world.send(None)


def serve_jobs(world: World) -> int:
    """A rank other than 0: train each job rank 0 sends until it releases this rank; return how
    many jobs ran."""
    done = 0
    while True:
        job = world.receive()
        if job is None:
            return done
        if not isinstance(job, TrainJob):
            raise TrainingError(f"rank {world.rank} received {type(job).__name__} instead of a training job")
        log.debug("rank %d: training job %d (%s, %d rows)", world.rank, done + 1, job.cfg.method, len(job.examples))
        model = load_model(job.source, job.models_dir, device=world.device, dtype=job.base_dtype)
        train(job.cfg, model, job.tokenizer, job.examples, job.out_dir, TrainOptions(
            resume=job.resume, fingerprint=job.fingerprint, device=world.device, show_progress=False, world=world))
        del model
        done += 1
