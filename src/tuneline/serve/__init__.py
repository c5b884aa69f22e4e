"""Serving: an OpenAI-compatible server with one base model in memory and the registry's adapters.

``build_app(...)`` returns the FastAPI app (tests drive it in-process or under uvicorn);
``tuneline serve`` runs it under uvicorn.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tuneline.errors import Problem, TunelineError
from tuneline.serve.app import ApiError, Key, ServerConfig, create_app, hash_key
from tuneline.serve.engine import Engine, Job, Result
from tuneline.serve.requestlog import RequestLog

__all__ = ["ApiError", "Engine", "Job", "Key", "RequestLog", "Result", "ServerConfig", "build_app", "compute_threads", "hash_key",
           "load_keys"]

KEYS_ENV = "TUNELINE_API_KEYS"


def _yaml_error(exc: Exception) -> str:
    """Where a YAML error is and what it is, without the text of the line (which may hold a key)."""
    mark = getattr(exc, "problem_mark", None)
    problem = str(getattr(exc, "problem", None) or "the file is not valid YAML or JSON")
    problem = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", problem)  # a quoted character or alias may be a key's
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_keys(path: str | Path | None) -> list[Key] | None:
    """API keys from a file (JSON or YAML) or, without one, from ``$TUNELINE_API_KEYS``
    (``key=model1,model2;key2=*``). None when neither is set.

    The file: ``keys: [{name, key: sk-... | sha256: HEX, models: [...], metrics: true|false}]``.
    ``sha256`` is the hex SHA-256 of the key (``printf %s sk-... | sha256sum``), so the file need not
    hold the key itself. ``models``: ``"*"``, ``NAME`` (every version), ``NAME@production`` (only
    that alias; also plain ``NAME``), ``NAME@candidate`` or ``NAME@3``. ``metrics: true`` lets the
    key read ``/metrics`` (a ``"*"`` key always may)."""
    if path is not None:
        import yaml

        p = Path(path)
        hint = "a YAML or JSON file: keys: [{name: team-a, sha256: <hex of the key>, models: ['support@production']}]"
        try:
            text = p.read_text()
        except OSError as exc:
            raise TunelineError(Problem(f"cannot read API keys: {exc.strerror or exc}", where=str(p), hint=hint)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # never the message itself: it quotes the offending line, which may be a key
            raise TunelineError(Problem(f"the API keys file is not valid YAML: {_yaml_error(exc)}", where=str(p),
                                        hint=hint)) from None
        entries = data.get("keys", []) if isinstance(data, dict) else []
        if not isinstance(entries, list):
            raise TunelineError(Problem("`keys` must be a list", where=str(p), field="keys", hint=hint))
        keys: list[Key] = []
        for i, entry in enumerate(entries):
            keys.append(_key_entry(entry, i, str(p)))
        if not keys:
            raise TunelineError(Problem("no keys in the file", where=str(p), hint="list them under `keys:`"))
        digests = [k.sha256 for k in keys]
        for i, d in enumerate(digests):
            if d in digests[:i]:
                raise TunelineError(Problem(f"entry {i} has the same key as entry {digests.index(d)}",
                                            where=str(p), field=f"keys.{i}", hint="each key once, with one scope"))
        return keys
    env = os.environ.get(KEYS_ENV, "").strip()
    if not env:
        return None
    out = []
    for i, part in enumerate(p for p in env.split(";") if p.strip()):
        token, _, models = part.partition("=")
        if not token.strip() or not models.strip():
            raise TunelineError(Problem(f"{KEYS_ENV} entry {i} is not key=model1,model2", field=KEYS_ENV))
        out.append(Key(f"env{i}", {m.strip() for m in models.split(",") if m.strip()}, hash_key(token.strip())))
    return out


def _key_entry(entry: Any, i: int, where: str) -> Key:
    field = f"keys.{i}"
    if not isinstance(entry, dict):
        raise TunelineError(Problem(f"entry {i} is not a mapping", where=where, field=field))
    token, digest = entry.get("key"), entry.get("sha256")
    if (token is None) == (digest is None):
        raise TunelineError(Problem(f"entry {i} needs exactly one of `key` and `sha256`", where=where, field=field,
                                    hint="sha256: the hex SHA-256 of the key, so the file does not hold the key"))
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise TunelineError(Problem(f"entry {i}: `key` must be a non-empty string", where=where, field=f"{field}.key"))
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-fA-F]{64}", digest.strip())):
        raise TunelineError(Problem(f"entry {i}: `sha256` must be 64 hex digits", where=where, field=f"{field}.sha256",
                                    hint="printf %s 'sk-...' | sha256sum"))
    models = entry.get("models") or []
    metrics = entry.get("metrics", False)
    if not isinstance(metrics, bool):
        raise TunelineError(Problem(f"entry {i}: `metrics` must be true or false", where=where, field=f"{field}.metrics"))
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise TunelineError(Problem(f"entry {i}: `models` must be a list of model names", where=where,
                                    field=f"{field}.models", hint="e.g. ['*'], ['support'], ['support@production']"))
    if not models and not metrics:
        raise TunelineError(Problem(f"entry {i} needs `models` (or `metrics: true` for a scraping key)",
                                    where=where, field=f"{field}.models"))
    sha = hash_key(token.strip()) if isinstance(token, str) else str(digest).strip().lower()
    return Key(str(entry.get("name") or f"key{i}"), {m.strip() for m in models}, sha, metrics)


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


def build_app(workspace: Any = None, *, keys: dict[str, Key] | list[Key] | None, log_url: str | None = None,
              base: str | None = None, max_batch: int = 8, resolve_ttl: float = 1.0, threads: int | None = None,
              **options: Any) -> Any:
    """The app for the workspace's registry: the base model loaded once, adapters on demand.
    ``threads``: see :func:`compute_threads` (CPU only). ``options``: more :class:`ServerConfig`
    fields (``max_queue``, ``request_timeout``, ``max_body_bytes``, ``metrics_public``,
    ``allowed_hosts``, ``default_max_tokens``)."""
    import torch

    from tuneline import registry
    from tuneline.models import load_model, load_tokenizer, resolve_model_source
    from tuneline.train import default_device, resolve_precision
    from tuneline.train.loop import autocast_for
    from tuneline.workspace import Workspace

    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    if base is None:
        bases = {v.tags.get("tuneline.base_model") for v in registry.list_versions(ws.tracking_uri)} - {None}
        if len(bases) > 1:
            raise TunelineError(Problem(f"registered models use different base models {sorted(map(str, bases))}",
                                        hint="one server holds one base model: pass --base"))
        base = next(iter(bases), None) or "smollm2-135m"
    source = resolve_model_source(str(base), Path.cwd())
    device = default_device()
    if device == "cpu":
        torch.set_num_threads(compute_threads(threads))
    precision = resolve_precision("auto", device)
    model = load_model(source, ws.models_dir, device=device, dtype="bf16" if precision == "bf16" else "fp32")
    tokenizer = load_tokenizer(source, ws.models_dir)
    engine = Engine(model, tokenizer, max_batch=max_batch, resolve_ttl=resolve_ttl,
                    autocast=autocast_for(precision, device))
    log = RequestLog(log_url or f"sqlite:///{ws.root / 'requests.db'}")
    app = create_app(engine, log, ServerConfig(registry_uri=ws.tracking_uri, keys=keys, base_name=str(base), **options))
    app.state.engine = engine
    app.state.request_log = log
    return app
