"""Serving: an OpenAI-compatible server with one base model in memory and the registry's adapters.

``build_app(...)`` returns the FastAPI app (tests drive it in-process or under uvicorn);
``tuneline serve`` runs it under uvicorn. Which module owns which endpoint and store:
``docs/serving.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, Unpack

from tuneline import registry
from tuneline.errors import Problem, TunelineError
from tuneline.models import load_model, load_tokenizer, resolve_model_source
from tuneline.monitor.store import RequestLog, RequestRecord
from tuneline.registry import VersionInfo
from tuneline.runtime import autocast_for, default_device, resolve_precision
from tuneline.serve.app import create_app
from tuneline.serve.config import ServerConfig
from tuneline.serve.engine import Engine, Job, Result
from tuneline.serve.errors import ApiError
from tuneline.serve.keys import KEYS_ENV, Key, hash_key, load_keys
from tuneline.serve.state import ServerState
from tuneline.workspace import Workspace

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["KEYS_ENV", "ApiError", "Engine", "Job", "Key", "RequestLog", "RequestRecord", "Result", "ServerConfig",
           "ServerOptions", "ServerState", "build_app", "compute_threads", "hash_key", "load_keys"]


class ServerOptions(TypedDict, total=False):
    """More :class:`ServerConfig` fields for :func:`build_app`."""

    default_max_tokens: int
    resolve: Callable[[str], VersionInfo] | None
    adapters_path: Callable[[VersionInfo], str] | None
    list_versions: Callable[[], list[VersionInfo]] | None
    max_queue: int
    request_timeout: float | None
    max_body_bytes: int
    metrics_public: bool
    allowed_hosts: list[str]
    retry_after_s: int


def compute_threads(requested: int | None = None) -> int:
    """Threads for the model's CPU kernels: ``requested``, or one fewer than the cores this process
    may use (at least 1). The event loop (tokenizing, JSON, streaming) and the request log's writer
    need a core too; when the kernels' threads and those compete for the same cores, the kernels'
    spinning barriers slow every generate step by up to 30x (measured: a 16-row batch of the tiny
    model took 0.2 s with one thread and 0.3-11 s with two while another process used a core)."""
    if requested is not None:
        return max(1, requested)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def build_app(workspace: Workspace | str | Path | None = None, *, keys: dict[str, Key] | list[Key] | None,
              log_url: str | None = None, base: str | None = None, max_batch: int = 8, resolve_ttl: float = 1.0,
              threads: int | None = None, **options: Unpack[ServerOptions]) -> FastAPI:
    """The app for the workspace's registry: the base model loaded once, adapters on demand.
    ``threads``: see :func:`compute_threads` (CPU only). ``options``: more :class:`ServerConfig`
    fields (``max_queue``, ``request_timeout``, ``max_body_bytes``, ``metrics_public``,
    ``allowed_hosts``, ``default_max_tokens``). The request log is ``log_url``, else the
    workspace's (:attr:`Workspace.requests_url`)."""
    import torch

    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    if base is None:
        base = _registered_base(ws)
    source = resolve_model_source(str(base), Path.cwd())
    device = default_device()
    if device == "cpu":
        torch.set_num_threads(compute_threads(threads))
    precision = resolve_precision("auto", device)
    dtype = "bf16" if precision == "bf16" else "fp32"
    model = load_model(source, ws.models_dir, device=device, dtype=dtype)
    tokenizer = load_tokenizer(source, ws.models_dir)
    engine = Engine(model, tokenizer, max_batch=max_batch, resolve_ttl=resolve_ttl,
                    autocast=autocast_for(precision, device),
                    # another copy of the base for each version served by a model of its own (DoRA, IA3, ...)
                    load_base=lambda: load_model(source, ws.models_dir, device=device, dtype=dtype))
    log = RequestLog(log_url or ws.requests_url)
    config = ServerConfig(registry_uri=ws.tracking_uri, keys=keys, base_name=str(base), adapter_cache=ws.adapters_dir,
                          **options)
    app = create_app(engine, log, config)
    app.state.engine = engine
    app.state.request_log = log
    return app


def _registered_base(ws: Workspace) -> str:
    """The one base model of the registered models (smollm2-135m when none is registered)."""
    bases = {v.tags.get("tuneline.base_model") for v in registry.list_versions(ws.tracking_uri)} - {None}
    if len(bases) > 1:
        raise TunelineError(Problem(f"registered models use different base models {sorted(map(str, bases))}",
                                    hint="one server holds one base model: pass --base"))
    return next(iter(bases), None) or "smollm2-135m"

