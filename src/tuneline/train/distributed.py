"""Data-parallel training over torch.distributed: which rank this process is, and the collectives
one optimizer step needs.

A distributed run is launched by ``tuneline run --nproc N`` (which starts ``torch.distributed.run``
on loopback), by ``torchrun`` or by ``accelerate launch``: every rank runs the same command. Rank 0
runs the pipeline (data, tracking, evaluation, registration); the other ranks wait for the training
job rank 0 sends them (:mod:`tuneline.train.ranks`), train alongside it, and wait for the next.

One optimizer step takes the same micro-batches whatever the world size. Each rank computes the
examples ``rank, rank + N, rank + 2N, ...`` of every micro-batch, with the loss divided by the
answer tokens of the *whole* step (every rank knows them: the batch order is seeded); the summed
gradients are then all-reduced once per step, so N processes compute the gradient one process
computes with the same global batch (up to the order of the float sums), and every replica takes
the same optimizer step. This is what DDP does with ``no_sync`` accumulation, done directly on the
trainable gradients: a rank whose share of a micro-batch is empty (the last, short batch of an
epoch) simply contributes zeros, where a DDP-wrapped forward would have to run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from tuneline.errors import Problem, TrainingError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# elements per all-reduce: large enough to amortise the call, small enough not to double the
# memory of a full fine-tuning's gradients
BUCKET = 1 << 24
OBJECTS_TIMEOUT = timedelta(days=2)
# set for the ranks `tuneline run --nproc` starts (the launcher, not rank 0, reports an interruption)
LAUNCHED_BY_NPROC = "TUNELINE_LAUNCHED_BY_NPROC"


def launched_world_size() -> int:
    """The world size the launcher (torchrun, accelerate launch) set; 1 outside one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass(frozen=True)
class World:
    """This process's place in a distributed training: ``rank`` of ``size``, on ``device``."""

    rank: int
    size: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of one micro-batch: every ``size``-th item from ``rank``."""
        return list(items[self.rank :: self.size])

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks (in place), in buckets of :data:`BUCKET`."""
        import torch
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        start = 0
        while start < len(grads):
            end, n = start, 0
            while end < len(grads) and (n == 0 or n + grads[end].numel() <= BUCKET):
                n += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
            dist.all_reduce(flat)
            offset = 0
            for g in grads[start:end]:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``params`` to every rank (replicas start identical)."""
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (float64, so token counts stay exact)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (whether to stop early: only rank 0 validates, which
        may take longer than a collective's usual timeout, hence the objects' group)."""
        return bool(_broadcast_object(flag))

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def send(self, obj: object) -> None:
        """Rank 0: send ``obj`` (picklable) to every other rank."""
        _broadcast_object(obj)

    def receive(self) -> object:
        """A rank other than 0: what rank 0 sent with :meth:`send`."""
        return _broadcast_object(None)


_WORLD: World | None = None
_OBJECTS = None  # a gloo group for pickled objects, whatever backend moves the gradients


def _broadcast_object(obj: object) -> object:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_OBJECTS)
    return box[0]


def current_world() -> World | None:
    """The world this process joined with :func:`join_world`; None in a single-process run."""
    return _WORLD


def join_world() -> World | None:
    """Join the process group the launcher described in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...): gloo on CPU, NCCL on CUDA (one device per local rank). None when this
    process was not launched as one of several."""
    if _WORLD is not None or launched_world_size() <= 1:
        return _WORLD
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return adopt_world(local_rank, device)


def adopt_world(local_rank: int, device: str) -> World:
    """This process's world in a process group that is already initialised (by :func:`join_world`,
    or by Ray Train on its workers)."""
    global _WORLD, _OBJECTS
    import torch.distributed as dist

    # the other ranks wait here while rank 0 prepares data, searches, validates and evaluates:
    # that may take hours, far past the 30 minutes a collective waits by default
    _OBJECTS = dist.new_group(backend="gloo", timeout=OBJECTS_TIMEOUT)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, device)
    log.debug("joined the process group: rank %d of %d on %s (%s)", _WORLD.rank, _WORLD.size, device,
              dist.get_backend())
    return _WORLD


def leave_world(destroy: bool = True) -> None:
    """Leave the process group (after rank 0 has released the others); ``destroy=False`` leaves it
    to whoever made it (Ray Train)."""
    global _WORLD, _OBJECTS
    if _WORLD is None:
        return
    import torch.distributed as dist

    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD, _OBJECTS = None, None


def launch_local(nproc: int, argv: list[str], verbose: bool = False) -> int:
    """Run ``python -m tuneline ARGV`` as ``nproc`` ranks on this machine through torch's elastic
    launcher (what ``torchrun --standalone`` does: a rendezvous on a free loopback port, every rank
    stopped when one fails); return rank 0's exit code (the command's: 3 when gates failed).

    Each rank computes with ``cores / nproc`` threads unless ``OMP_NUM_THREADS`` says otherwise."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not verbose:  # the agent logs every rank's exit at ERROR, including a gate's exit 3
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED_BY_NPROC] = "1"
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise TrainingError(Problem(f"--nproc {nproc} needs {nproc} GPUs (one per process); this machine has "
                                    f"{torch.cuda.device_count()}", hint=f"use --nproc {torch.cuda.device_count()}"))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"tuneline-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "tuneline", *argv)
    except SignalException as exc:  # Ctrl-C or a TERM: the agent has stopped every rank
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from exc  # the command's own message: the checkpoints are kept
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        failure = exc.failures.get(0) or next(iter(exc.failures.values()))
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # a signal: 128 + its number
    return 0


# ------------------------------------------------------------------ sharded (FSDP2) full fine-tuning


def shard(model: torch.nn.Module) -> None:
    """Shard ``model`` across the ranks with FSDP2: each decoder layer is one unit (gathered for its
    forward and backward, freed after), the rest (embeddings, final norm, head) the root's. The
    gradients are summed across the ranks, not averaged: each rank's loss is already divided by
    the answer tokens of the whole step."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainable weights and the optimizer state of a sharded model, whole, on rank 0's CPU
    (every rank must call it: it gathers the shards), in the layout a one-process checkpoint has:
    weights by parameter name, optimizer state by parameter index. So a checkpoint of a sharded run
    resumes on any number of processes, sharded or not. Other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = _trainable_names(model)
    weights = get_model_state_dict(model, options=options)
    optim: dict[str, Any] = dict(get_optimizer_state_dict(model, optimizer, options=options))
    if not weights:
        return {}, {}
    index = {n: i for i, n in enumerate(names)}
    return ({n: weights[n] for n in names},
            {"state": {index[k]: v for k, v in optim["state"].items()},
             "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]})


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Any],
               optim: dict[str, Any]) -> None:
    """Load a whole (one-process layout) checkpoint state into a sharded model and its optimizer:
    every rank reads the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    names = _trainable_names(model)
    # copies of the dicts (not of the tensors): torch puts the shards it makes in the dicts it is given
    set_model_state_dict(model, dict(weights), options=options)
    by_name: Any = {"state": {names[int(i)]: dict(v) for i, v in optim["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def unsharded_copy(model: torch.nn.Module, weights: dict[str, Any]) -> torch.nn.Module:
    """Rank 0: a plain (unsharded) copy of a sharded transformers model, from its gathered
    ``weights``, to save and evaluate in one process."""
    import torch
    from transformers import AutoModelForCausalLM

    config: Any = model.config  # a transformers model
    dtype = next(iter(weights.values())).dtype
    copy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"the gathered weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    copy.tie_weights()
    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        copy.to(device.type if device.type == "cpu" else device)
    return copy
